"""One table: the user-facing scheduler name (as Replicate's model spells it) -> diffusers scheduler class."""

from __future__ import annotations

from typing import Any

# name -> class name in diffusers; the classes are imported only when a scheduler is made.
_SCHEDULER_CLASSES = {
    "DDIM": "DDIMScheduler",
    "K_EULER": "EulerDiscreteScheduler",
    "DPMSolverMultistep": "DPMSolverMultistepScheduler",
    "K_EULER_ANCESTRAL": "EulerAncestralDiscreteScheduler",
    "PNDM": "PNDMScheduler",
    "KLMS": "LMSDiscreteScheduler",  # needs scipy
}
SCHEDULER_NAMES = tuple(_SCHEDULER_CLASSES)


def make_scheduler(name: str, config: Any) -> Any:
    """A fresh scheduler for one prediction, built from the checkpoint's scheduler config.

    Each prediction gets its own instance: schedulers hold per-run state (timesteps, step index),
    so sharing one between requests would leak state from one prediction into the next.
    """
    import diffusers

    try:
        class_name = _SCHEDULER_CLASSES[name]
    except KeyError:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULER_NAMES)}, got {name!r}") from None
    return getattr(diffusers, class_name).from_config(config)
