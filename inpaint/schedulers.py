"""One table: the user-facing scheduler name (as Replicate's model spells it) -> diffusers scheduler class."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported by setup, not by predict.py's import of the input choices
    import torch

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

# These index their (host-side) alphas with the timestep itself; the others keep a step index.
_INDEXED_BY_TIMESTEP = ("DDIM", "PNDM")


class HostTimesteps:
    """Give step() the timestep as a host number, so a denoising step never waits on the GPU.

    The pipeline hands step() `t`, an element of the scheduler's own `timesteps` tensor, which lives
    on the GPU. DDIM and PNDM index their alphas with it: a `.item()` on a GPU tensor, that is a
    host-device synchronisation, twice per step. `t` is a view into `timesteps`, so its position
    (tensor metadata, read without touching the GPU) picks the same value from a list copied to the
    host once per run. The numbers are identical; anything else passed in goes through unchanged.
    """

    def set_timesteps(self, *args: Any, **kwargs: Any) -> None:
        super().set_timesteps(*args, **kwargs)
        self._host_timesteps = self.timesteps.tolist()

    def step(self, model_output: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        return super().step(model_output, self._on_host(timestep), *args, **kwargs)

    def _on_host(self, timestep: Any) -> Any:
        timesteps = self.timesteps
        if (
            isinstance(timestep, type(timesteps))  # a tensor, without importing torch here
            and timestep.dim() == 0
            and timestep.device == timesteps.device
            and timestep.untyped_storage().data_ptr() == timesteps.untyped_storage().data_ptr()
        ):
            return self._host_timesteps[timestep.storage_offset() - timesteps.storage_offset()]
        return timestep


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
    cls = getattr(diffusers, class_name)
    if name in _INDEXED_BY_TIMESTEP:
        cls = type(class_name, (HostTimesteps, cls), {"__module__": __name__})
    return cls.from_config(config)
