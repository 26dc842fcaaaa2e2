"""Stable Diffusion 2 inpainting: the logic behind the Cog model in predict.py.

Modules, one concern each:
  config       deployment settings (environment variables, read in one place)
  inputs       the request: bounds, defaults and validation of every input
  codec        decoding uploaded files into arrays, encoding output files
  urlinputs    a photo or mask given as a URL or data URI: fetched inside run(), held to the limits, then removed
  egress       the HTTP of a URL a request names: to public addresses (or listed networks) only, one deadline
  geometry     sizes: working size, mapping back to the input's size
  compositing  masks and pixels: clean-up, feather, paste the result over the original
  schedulers   user-facing scheduler name -> diffusers scheduler
  weights      where the weights live: manifest, download, sha256 verification
  safety       the safety checker: per-output flags, never an exception for content
  pipeline     load the model components and run one inpainting
  fastpath     the GPU speed-ups as one object the service owns (a no-op on the CPU):
    keys         the shape key of a CUDA graph or a compiled part
    graphs       a part's call replayed as a CUDA graph per shape key
    compiler     the UNet and VAE compiled per shape in the background, saved for later starts
  stopwatch    timing: CUDA events on a GPU, wall time on the CPU
  cachetrust   the compile cache is code: private folders, sealed (HMAC) parts and Inductor cache, rejects kept
  service      one prediction end to end: files in, files and metrics out
  concurrency  several predictions at once: a thread each, the model's turns in order, cancelling, output folders
  tracing      OpenTelemetry spans for a prediction's stages, when Cog's tracing is on
  activity     predictions in run(), in a file the probes read: whether Cog's server has lost its slots
  environment  what the container runs on: Cog's server version, the NVIDIA driver (checked at setup)
  startup      setup's work in the quickest order: weights read while the libraries import, GC paused

Nothing here imports torch or touches the network at import time of this file.
"""
