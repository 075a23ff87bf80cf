"""Every default once: the default run (`mgrpo train`) is the schema's defaults, and its warm start ships."""
from conftest import compose
from omegaconf import OmegaConf

from mgrpo_cli.cli import build
from mgrpo_cli.config.schema import TrainAppConfig
from mgrpo_cli.reporting.tracking import flatten
from mgrpo_cli.training.warmup import SHIPPED, cache_key


def test_the_default_run_is_the_schemas_defaults():
    run = flatten(OmegaConf.to_container(compose("train"), resolve=False))
    run.pop("hydra", None)
    schema = flatten(OmegaConf.to_container(OmegaConf.structured(TrainAppConfig), resolve=False))
    differ = {k: (run.get(k), schema.get(k)) for k in run.keys() | schema.keys() if run.get(k) != schema.get(k)}
    assert differ == {}, "the group files of the default run set values the schema does not default to"


def test_the_default_configs_warm_start_is_the_shipped_one():
    """A change to anything that shapes the warm start (model sizes, arith task, warm-up settings,
    phrases, budgets, seed) gives a new key: `mgrpo train` would then train a new warm start first."""
    key = cache_key(build.warmup_spec(compose("train")))
    shipped = sorted(p.name for p in SHIPPED.iterdir() if (p / "warmup.json").is_file())
    assert shipped == [key]
