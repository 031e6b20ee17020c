"""flat_ray: Ray-distributed runner for FLAT LLM unlearning.

Where things live (the folder tree is the architecture):

- ``flat_ray.config``    run configuration dataclasses, YAML loading, ``key=value`` overrides, validation
- ``flat_ray.registry``  the small registry behind divergences, methods, benchmarks and profiles
- ``flat_ray.losses``    pure-torch losses: FLAT and its eight f-divergences, the baselines, the methods registry
- ``flat_ray.data``      benchmark loaders, prompt formatting, template answers, the collator
- ``flat_ray.models``    model/tokenizer loading, prompt profiles, the tiny-model builder
- ``flat_ray.assets``    the work directory, the cached tiny model and the demo's original model
- ``flat_ray.pipeline``  config -> model, tokenizer, dataset, collator; the dry run
- ``flat_ray.engine``    the training step, schedule math, the per-worker loop, DeepSpeed (``engine.ds`` only),
                         a one-process replica of a run (``engine.replica``)
- ``flat_ray.eval``      TOFU/MUSE/hp metrics and suites, the metric and truth-ratio registries, batched
                         scoring and generation, lm-eval, ``flat-ray eval``
- ``flat_ray.tracking``  the only mlflow import
- ``flat_ray.console``   progress bars or lines, per-epoch tables, the sweep's live table
- ``flat_ray.sweep``, ``flat_ray.report``  search spaces (no Ray) and sweep reports
- ``flat_ray.launch``    the only Ray code: driver, per-worker function, progress relay, Tune sweeps
- ``flat_ray.distributed``, ``fileio``, ``errors``, ``envinfo``  collectives, atomic writes, error types, ``flat-ray env``
"""

__version__ = "0.1.0"
