"""Config loading and validation: every bad input fails at start-up with the key named."""
import pytest

from lad_jax.config import Config, ConfigError, check_devices, load_config, resolve_config_path, save_config


def _err(overrides, num_devices=8, path="configs/tiny_test.yaml"):
    with pytest.raises(ConfigError) as exc:
        load_config(path, overrides, num_devices=num_devices)
    return str(exc.value)


def test_default_and_tiny_configs_load():
    c = load_config(num_devices=1)
    assert isinstance(c, Config) and c.task.name == "numbers" and c.algorithm.loss == "lad"
    assert c.algorithm.divergence == "js" and c.algorithm.eta == 2.0
    t = load_config("configs/tiny_test.yaml", ["algorithm.loss=grpo", "optimizer.lr=1e-4", "seed=3"])
    assert t.algorithm.loss == "grpo" and t.optimizer.lr == 1e-4 and t.seed == 3
    assert resolve_config_path(None).name == "default.yaml"


def test_unknown_key_is_named():
    assert "algorithm.bogus" in _err(["algorithm.bogus=1"])
    assert "'nosuch'" in _err(["nosuch.key=1"])


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("rollout:\n  num_samplez: 4\n")
    with pytest.raises(ConfigError, match="rollout.num_samplez"):
        load_config(p)


def test_wrong_type_is_named():
    assert "algorithm.mu" in _err(["algorithm.mu=two"])
    assert "optimizer.lr" in _err(["optimizer.lr=fast"])
    assert "logging.tensorboard" in _err(["logging.tensorboard=3"])


def test_eta_must_be_positive():
    msg = _err(["algorithm.eta=0"])
    assert "algorithm.eta" in msg and "> 0" in msg
    assert "algorithm.eta" in _err(["algorithm.eta=-1"])


def test_unknown_names():
    assert "algorithm.loss" in _err(["algorithm.loss=ppo"])
    assert "algorithm.divergence" in _err(["algorithm.divergence=wasserstein"])
    assert "rollout.old_logprobs" in _err(["rollout.old_logprobs=cache"])


def test_divisibility():
    msg = _err(["algorithm.minibatch_size=12"])  # 8 prompts x 4 samples = 32
    assert "algorithm.minibatch_size" in msg and "32" in msg
    assert "algorithm.micro_batch_size" in _err(["algorithm.micro_batch_size=3", "algorithm.minibatch_size=16"])


def test_mesh_vs_device_count():
    msg = _err(["mesh.data=3", "mesh.fsdp=1"], num_devices=8)
    assert "mesh.data*mesh.fsdp*mesh.tensor" in msg
    assert "mesh" in _err(["mesh.data=3"], num_devices=8)
    c = load_config("configs/tiny_test.yaml", ["mesh.data=2", "mesh.fsdp=-1", "mesh.tensor=2"])
    assert check_devices(c, 8) == (2, 2, 2)


def test_batch_vs_data_axes():
    msg = _err(["mesh.data=8", "mesh.fsdp=1", "algorithm.micro_batch_size=4", "algorithm.minibatch_size=16"])
    assert "algorithm.micro_batch_size" in msg and "mesh.data*mesh.fsdp=8" in msg


def test_arch_vs_init_from():
    assert "model.model_type" in _err(["init_from=/some/ckpt"])
    assert "model.num_layers" in _err(["model.num_layers=null"])


def test_resolved_config_roundtrip(tmp_path):
    c = load_config("configs/tiny_test.yaml", ["algorithm.loss=grpo"])
    save_config(c, str(tmp_path / "config.yaml"))
    assert load_config(tmp_path / "config.yaml") == c


def test_distributed_switch():
    from lad_jax.distributed import wants_distributed

    assert not wants_distributed("auto", {})
    assert wants_distributed("auto", {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert wants_distributed("auto", {"SLURM_NTASKS": "4"}) and not wants_distributed("auto", {"SLURM_NTASKS": "1"})
    assert not wants_distributed("auto", {"TPU_WORKER_HOSTNAMES": "host0"})
    assert wants_distributed("on", {}) and not wants_distributed("off", {"JAX_COORDINATOR_ADDRESS": "x:1"})
    assert "mesh.distributed" in _err(["mesh.distributed=maybe"])


def test_explicit_coordinator_keys():
    """Launches without a cluster manager: address, count and id; inconsistent combinations fail naming the key."""
    from lad_jax.distributed import initialize_kwargs, wants_distributed

    ok = ["mesh.coordinator_address=127.0.0.1:12355", "mesh.num_processes=2", "mesh.process_id=1"]
    m = load_config("configs/tiny_test.yaml", ok).mesh
    assert (m.coordinator_address, m.num_processes, m.process_id) == ("127.0.0.1:12355", 2, 1)
    assert wants_distributed(m.distributed, {}, m.coordinator_address)
    assert initialize_kwargs(m, {}) == {"coordinator_address": "127.0.0.1:12355", "num_processes": 2, "process_id": 1}
    assert "mesh.process_id" in _err(ok[:2])
    assert "mesh.num_processes" in _err(ok[2:])
    assert "mesh.num_processes" in _err(ok[:1])
    assert "[0, mesh.num_processes=2)" in _err(ok[:2] + ["mesh.process_id=2"])
    assert "HOST:PORT" in _err(["mesh.coordinator_address=localhost"] + ok[1:])
    assert "mesh.distributed=off" in _err(ok + ["mesh.distributed=off"])
    # count and id with the address from the environment (JAX reads only the address from it)
    env_only = load_config("configs/tiny_test.yaml", ok[1:]).mesh
    assert initialize_kwargs(env_only, {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1"}) == {"num_processes": 2,
                                                                                      "process_id": 1}
    with pytest.raises(ConfigError, match="mesh.coordinator_address"):
        initialize_kwargs(env_only, {})


def test_distributed_accepts_yaml_booleans(tmp_path):
    """A bare on/off is a YAML boolean; mesh.distributed=on on the command line must mean "on", not fail."""
    assert load_config("configs/tiny_test.yaml", ["mesh.distributed=on"]).mesh.distributed == "on"
    assert load_config("configs/tiny_test.yaml", ["mesh.distributed=off"]).mesh.distributed == "off"
    assert load_config("configs/tiny_test.yaml", ["mesh.distributed=true"]).mesh.distributed == "on"
    assert load_config("configs/tiny_test.yaml", ["mesh.distributed='on'"]).mesh.distributed == "on"
    p = tmp_path / "c.yaml"
    p.write_text(resolve_config_path("configs/tiny_test.yaml").read_text().replace(
        "mesh:\n", "mesh:\n  distributed: off\n", 1))
    assert load_config(p).mesh.distributed == "off"
    assert "mesh.distributed" in _err(["mesh.distributed=1"])  # other non-strings still fail
    assert "expected a string" in _err(["run_name=true"])  # only the mesh.distributed field maps booleans


def test_configs_have_one_source(tmp_path, monkeypatch):
    """lad_jax/configs (package data) and configs/ are the same files, found from any cwd."""
    from lad_jax.config import package_configs, repo_root

    monkeypatch.chdir(tmp_path)
    shipped = sorted(p.name for p in package_configs().glob("*.yaml"))
    assert "default.yaml" in shipped and "tiny_test.yaml" in shipped
    if (repo_root() / "configs").is_dir():  # a checkout (not an installed wheel)
        assert shipped == sorted(p.name for p in (repo_root() / "configs").glob("*.yaml"))
        for name in shipped:
            assert (package_configs() / name).samefile(repo_root() / "configs" / name), name
    assert resolve_config_path(None) == package_configs() / "default.yaml"
    assert load_config("configs/tiny_test.yaml").run_name == "tiny"
    assert load_config("tiny_test.yaml").run_name == "tiny"
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.yaml")
