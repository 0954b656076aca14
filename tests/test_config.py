"""Invalid configuration fails before any work, naming the key and the allowed values."""

import pytest

from fedmeta.config import ConfigError, ExperimentConfig, resolve
from fedmeta.runtime.hydra_config import compose


def test_defaults_compose_and_validate():
    cfg = compose([])
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.runtime.kind == "simulation"
    assert [c.domain for c in cfg.data.clients] == ["ecommerce", "social"]
    assert sum(c.n_clients - c.new_clients for c in cfg.data.clients) == 8
    assert cfg.privacy.local.enabled and cfg.privacy.local.target_epsilon == 8.0


@pytest.mark.parametrize("override, key", [
    ("algorithm.name=sgd", "algorithm.name"),
    ("algorithm.inner_lr=0", "algorithm.inner_lr"),
    ("algorithm.server_optimizer=rmsprop", "algorithm.server_optimizer"),
    ("model.size=huge", "model.size"),
    ("runtime.kind=cloud", "runtime.kind"),
    ("runtime.rounds=0", "runtime.rounds"),
    ("runtime.rounds=ten", "runtime.rounds"),
    ("runtime.device=tpu", "runtime.device"),
    ("runtime.fraction_train=1.5", "runtime.fraction_train"),
    ("data.cold_fraction=1.0", "data.cold_fraction"),
    ("data.support_fraction=0", "data.support_fraction"),
    ("privacy.local.mechanism=zcdp", "privacy.local.mechanism"),
    ("privacy.central.side=middle", "privacy.central.side"),
])
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError) as err:
        compose([override])
    assert str(err.value).startswith(key), str(err.value)


def test_allowed_values_are_listed():
    with pytest.raises(ConfigError, match=r"\['fedavg', 'fomaml', 'maml', 'perfedavg', 'reptile'\]"):
        compose(["algorithm.name=sgd"])


def test_local_dp_needs_exactly_one_of_noise_or_target():
    with pytest.raises(ConfigError, match="privacy.local"):
        compose(["privacy=local", "privacy.local.noise_multiplier=1.0"])   # both set
    with pytest.raises(ConfigError, match="privacy.local"):
        compose(["privacy=local", "privacy.local.target_epsilon=null"])    # neither set


def test_hooks_mode_is_refused_for_per_user_adapted_algorithms():
    with pytest.raises(ConfigError, match="grad_sample_mode"):
        compose(["privacy=local", "privacy.local.grad_sample_mode=hooks", "algorithm=maml"])
    assert compose(["privacy=local", "privacy.local.grad_sample_mode=hooks",
                    "algorithm=fedavg"]).privacy.local.grad_sample_mode == "hooks"


def test_resolve_accepts_plain_dicts():
    cfg = resolve({"algorithm": {"name": "reptile"}, "runtime": {"rounds": 3}})
    assert cfg.algorithm.name == "reptile" and cfg.runtime.rounds == 3
    with pytest.raises(ConfigError, match="runtime.rounds"):
        resolve({"runtime": {"rounds": -1}})


def test_unknown_synthetic_key_is_a_config_error():
    from fedmeta.runtime.federation import load_data

    with pytest.raises(ConfigError, match="data.synthetic"):
        load_data(compose(["+data.synthetic.n_userz=5"]))


def test_each_algorithm_has_its_own_schema_and_refuses_other_keys():
    from fedmeta.algorithms.registry import algorithm_config, names
    from fedmeta.runtime.hydra_config import compose

    assert set(names()) == {"fedavg", "reptile", "fomaml", "maml", "perfedavg"}
    assert compose(["algorithm=perfedavg"]).algorithm.variant == "hf"
    with pytest.raises(ConfigError, match=r"algorithm\.variant: not a key of 'fedavg'"):
        compose(["algorithm=fedavg", "+algorithm.variant=hf"])
    with pytest.raises(ConfigError, match=r"algorithm\.name"):
        algorithm_config({"name": "nope"})
    with pytest.raises(ConfigError, match=r"algorithm\.variant"):
        algorithm_config({"name": "perfedavg", "variant": "so"})
