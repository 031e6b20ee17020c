"""flat_ray: Ray-distributed runner for FLAT LLM unlearning.

Where things live (the folder tree is the architecture):

- ``flat_ray.config``    run configuration dataclasses, YAML loading, ``key=value`` overrides, validation
- ``flat_ray.registry``  the small registry behind divergences, methods, benchmarks and profiles
- ``flat_ray.losses``    pure-torch losses: FLAT and its eight f-divergences
- ``flat_ray.data``      benchmark loaders, prompt formatting, template answers, the collator
- ``flat_ray.models``    model/tokenizer loading, prompt profiles, the tiny-model builder
"""

__version__ = "0.1.0"
