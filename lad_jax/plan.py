"""Compile every jitted phase of a training run for a target slice, with abstract arrays, and report per-chip memory.

    python -m lad_jax.plan --config configs/qwen2.5-7b_dapo_lad.yaml --topology v5p-64 [key.sub=value ...] [--json]
    python -m lad_jax.plan --config configs/tiny_test.yaml --devices 8

The phases are the trainer's own jitted functions, built by the trainer's own code (`train_setup.train_objects`,
`train_step.TrainStep`, `train_step.make_logprob_fn`, and for the rollout and the eval `sampler_plan.compile_rollout`,
which compiles `sampler_loop`'s phases in the order `sampler.generate` runs them, each phase's inputs being the
previous phase's compiled outputs) and lowered with `jax.ShapeDtypeStruct`s that carry the trainer's shardings: no
weights are read or allocated. The architecture comes from `init_from`'s local
config.json, or for a hub id, the built-in table `lad_jax.models.known_configs` (no download).

`--topology NAME` compiles for a TPU slice with libtpu's compile-only topologies (`pip install -e .[plan]`; no TPU
needed); `--devices N` compiles for N fake CPU devices. Per phase it prints the per-chip sizes from
`compiled.memory_analysis()` (arguments, outputs, temporaries, peak), the train-state bytes that stay resident
during the phase but are not among its arguments (the optimizer state during the rollout), the compile time and
whether the sum fits the chip's HBM. Exit status 3 when a phase does not fit (or the TPU compiler reports
RESOURCE_EXHAUSTED), 2 for a usage error.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

GIB = 1024 ** 3

# Slice name -> (topology_name, chip_config_name, chips_per_host_bounds) for libtpu's get_topology_desc.
# v4 / v5p names count TensorCores (2 per chip, megacore), v5e / v6e names count chips.
_MEGACORE_SHAPES = {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4"}
_LITE_SHAPES = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8"}


def topology_table() -> dict[str, tuple[str, str, tuple[int, int, int]]]:
    table = {}
    for cores, shape in _MEGACORE_SHAPES.items():
        table[f"v5p-{cores}"] = (f"v5:{shape}", "megacore", (2, 2, 1))
        if cores <= 64:
            table[f"v4-{cores}"] = (f"v4:{shape}", "megacore", (2, 2, 1))
    for chips, shape in _LITE_SHAPES.items():
        bounds = (1, 1, 1) if chips == 1 else (2, 4, 1) if chips == 8 else (2, 2, 1)
        for family, gen in (("v5e", "v5e"), ("v5litepod", "v5e"), ("v6e", "v6e")):
            table[f"{family}-{chips}"] = (f"{gen}:{shape}", "default", bounds)
    return table


TOPOLOGIES = topology_table()

# Per-chip HBM by device_kind, and what the TPU compiler lets a program use (its RESOURCE_EXHAUSTED messages report
# 30.75 GiB on v4 and 15.75 GiB on v5e: 0.25 GiB is reserved; the same reserve is assumed on v5p / v6e).
HBM_GIB = {"TPU v4": 32.0, "TPU v5": 95.0, "TPU v5p": 95.0, "TPU v5 lite": 16.0, "TPU v6 lite": 32.0}
COMPILER_RESERVE_GIB = 0.25


GROUPS = ("train_step", "recompute", "rollout", "eval")  # --phases: which of the run's phase groups to compile


class PlanError(Exception):
    """A usage error (bad flag, unknown topology, unknown architecture); the message names what to change."""


@dataclasses.dataclass
class Phase:
    name: str
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    peak_bytes: int  # arguments + outputs - aliased (donated) + temporaries: everything the program holds at once
    resident_bytes: int  # train state alive during the phase that is not one of its arguments
    compile_s: float
    compiler_peak_bytes: int = 0  # memory_analysis().peak_memory_in_bytes where the backend reports one
    error: str | None = None  # the compiler's message when it refused (e.g. RESOURCE_EXHAUSTED)

    @property
    def total_bytes(self) -> int:
        return self.peak_bytes + self.resident_bytes


# ---- devices -----------------------------------------------------------------------------------------------------
def topology_devices(name: str):
    if name not in TOPOLOGIES:
        raise PlanError(f"--topology {name!r} is not known; use one of {', '.join(sorted(TOPOLOGIES))}")
    try:
        from jax.experimental import topologies
        topo, chip_config, bounds = TOPOLOGIES[name]
        return list(topologies.get_topology_desc(topology_name=topo, platform="tpu", chip_config_name=chip_config,
                                                 chips_per_host_bounds=bounds, num_slices=1).devices)
    except Exception as e:  # libtpu missing or unable to describe the topology
        raise PlanError(f"--topology {name}: cannot build the TPU topology ({str(e).splitlines()[0][:200]}); "
                        "install libtpu (pip install -e .[plan]) or plan for fake CPU devices with --devices N") from None


def usable_hbm_bytes(devices, hbm_gib: float | None) -> int | None:
    if hbm_gib is not None:
        return int(hbm_gib * GIB)
    kind = devices[0].device_kind
    if devices[0].platform != "tpu" or kind not in HBM_GIB:
        return None
    return int((HBM_GIB[kind] - COMPILER_RESERVE_GIB) * GIB)


# ---- model config and abstract arrays ----------------------------------------------------------------------------
def model_config(c):
    """The ModelConfig the trainer would build, without weights: init_from's config.json (a local directory) or the
    built-in table of hub ids; a from-scratch model takes its vocabulary from the task's tokenizer."""
    from lad_jax.models import ModelConfig
    from lad_jax.models.known_configs import known_hf_config
    from lad_jax.train_setup import lora_spec, scratch_model_config

    m = c.model
    if c.init_from is not None:
        path = os.path.join(c.init_from, "config.json")
        if os.path.isfile(path):
            with open(path) as f:
                hf = json.load(f)
        else:
            hf = known_hf_config(c.init_from)
            if hf is None:
                from lad_jax.models import known_configs
                raise PlanError(f"init_from={c.init_from!r}: no local config.json and not in the built-in table "
                                f"({', '.join(sorted(known_configs.HF_CONFIGS))}); pass a directory holding its "
                                "config.json")
        return ModelConfig.from_hf_config(hf, param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat,
                                          attention=m.attention).replace(lora=lora_spec(c))
    if c.task.name != "none":
        import tempfile

        from lad_jax.tasks import get_task
        from lad_jax.tokenizer import load_tokenizer
        with tempfile.TemporaryDirectory(prefix="lad_jax_plan_") as d:
            get_task(c.task.name).build_tokenizer(d)
            tok = load_tokenizer(d)
    elif c.model.tokenizer is not None:
        from lad_jax.tokenizer import load_tokenizer
        tok = load_tokenizer(c.model.tokenizer)
    else:
        raise PlanError("init_from=null needs model.tokenizer (its vocabulary sizes the embedding)")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return scratch_model_config(c, len(tok), tok.eos_token_id, pad)


def _abstract(tree, shardings):
    import jax
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _bytes_per_chip(tree) -> int:
    import jax
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * jax.dtypes.itemsize_bits(x.dtype) // 8  # uint4 (nf4 codes) packs two per byte
    return total


def _out_of_memory(e: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(e) or "Ran out of memory" in str(e)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


# ---- the phases --------------------------------------------------------------------------------------------------
class Planner:
    """Builds the trainer's objects for config `c` on `mesh` with abstract arrays and compiles each phase."""

    def __init__(self, c, mesh, log=lambda msg: None, limit: int | None = None):
        import jax
        from flax import nnx

        from lad_jax import train_setup
        from lad_jax import train_step as ts
        from lad_jax.models import Transformer

        self.c, self.mesh, self.log, self.limit = c, mesh, log, limit
        self.decode_choice = None  # rollout.decode_slots=auto resolved against `limit` (usable HBM per chip)
        self.model_config = model_config(c)
        abstract_model = nnx.eval_shape(lambda: Transformer(self.model_config, rngs=nnx.Rngs(c.seed)))
        # train_objects only reads shapes and shardings from the model, so the abstract one gives the real ones.
        self.graphdef, params, self.tx, self.schedule, self.shardings = train_setup.train_objects(
            c, abstract_model, mesh)
        shapes = jax.eval_shape(lambda p: ts.init_train_state(self.tx, p, self.shardings), params)
        self.state = _abstract(shapes, self.shardings)
        self.step_fn = ts.TrainStep(c, self.graphdef, self.tx, self.schedule, mesh, self.shardings)
        # With the KL term a frozen copy of the params (the reference policy) stays alive beside every phase.
        self.ref_bytes = _bytes_per_chip(self.state["params"]) if c.algorithm.kl_coef > 0 else 0
        self.opt_bytes = (_bytes_per_chip({"opt_state": self.state["opt_state"], "step": self.state["step"]})
                          + self.ref_bytes)
        self.phases: list[Phase] = []

    def _compile(self, name, lower, resident: int):
        t0 = time.perf_counter()
        try:
            compiled = lower().compile()
        except Exception as e:  # the TPU compiler refuses programs that exceed HBM
            if not _out_of_memory(e):
                raise
            self.phases.append(Phase(name, 0, 0, 0, 0, 0, resident, time.perf_counter() - t0, error=_first_line(e)))
            return None
        self._record(name, compiled, resident, time.perf_counter() - t0)
        return compiled

    def _record(self, name, compiled, resident: int, dt: float):
        m = compiled.memory_analysis()
        arg, out, alias, temp = (int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                                 int(m.alias_size_in_bytes), int(m.temp_size_in_bytes))
        self.phases.append(Phase(name, arg, out, alias, temp, arg + out - alias + temp, resident, dt,
                                 compiler_peak_bytes=int(getattr(m, "peak_memory_in_bytes", 0) or 0)))
        self.log(f"{name}: compiled in {dt:.1f}s, peak {(arg + out - alias + temp) / GIB:.3f} GiB per chip")

    def train_step(self):
        import jax
        import jax.numpy as jnp

        a, r = self.c.algorithm, self.c.rollout
        from lad_jax.experience import prompt_bucket
        t = prompt_bucket(self.c) + r.max_new_tokens
        n_micro, m = a.minibatch_size // a.micro_batch_size, a.micro_batch_size
        dtypes = {"tokens_bt": jnp.int32, "positions_bt": jnp.int32, "valid_bt": jnp.bool_,
                  "response_bt": jnp.bool_, "old_logp_bt": jnp.float32, "advantages_b": jnp.float32,
                  "ref_logp_bt": jnp.float32}
        batch = {k: jax.ShapeDtypeStruct((n_micro, m) if k == "advantages_b" else (n_micro, m, t), dtypes[k],
                                         sharding=sh) for k, sh in self.step_fn.batch_shardings.items()}
        return self._compile("train_step", lambda: self.step_fn.lower(self.state, batch), self.ref_bytes)

    def recompute(self):
        import jax
        import jax.numpy as jnp

        from lad_jax.experience import prompt_bucket
        from lad_jax.train_step import batch_sharding, full_params, make_logprob_fn

        c = self.c
        fn = make_logprob_fn(self.graphdef, self.mesh, full_params(self.shardings), c.rollout.temperature,
                             c.model.logprob_chunk_size)
        rows = batch_sharding(self.mesh, 2, lead=0)
        shape = (c.batch_size, prompt_bucket(c) + c.rollout.max_new_tokens)
        args = [jax.ShapeDtypeStruct(shape, d, sharding=rows) for d in (jnp.int32, jnp.int32, jnp.bool_)]

        def lower():
            with jax.set_mesh(self.mesh):
                return fn.lower(full_params(self.state), *args)
        return self._compile("recompute", lower, self.opt_bytes)

    def generate(self, label: str, prompts: int, samples: int, prompt_bucket: int, max_new_tokens: int,
                 sampling, decode_slots: int = 0):
        """The phases of one `sampler.generate` call, compiled in its order by `sampler_plan.compile_rollout` (each
        phase's inputs are the previous phase's compiled outputs). `resident_bytes` adds what `generate` keeps alive
        beside the phase's own arguments: the optimizer state always; the params, the decode weights and the sampler
        state where they are not arguments; during a layer-by-layer cache growth, the other layers' buffers at the
        worst moment (the last layer, every earlier one already grown). With `decode_slots` the phases are
        `generate_continuous`'s (`sampler_plan.compile_continuous`), whose prefix store stays alive for the call."""
        from lad_jax import sampler_plan

        from lad_jax.train_step import full_params

        params_bytes = _bytes_per_chip(full_params(self.state))
        weights_bytes = 0
        state_bytes = 0  # the sampler state (cache and token buffers) the previous phase left
        grown_k = 0  # bytes the k buffers gained in this window's growth
        prefix_bytes = 0  # continuous batching: the prefix store (prefill's outputs), an argument of every phase
        shapes = dict(prompts=prompts, num_samples=samples, prompt_bucket=prompt_bucket, max_new_tokens=max_new_tokens,
                      sampling=sampling)
        phases = (sampler_plan.compile_continuous(self.model_config, self.mesh, decode_slots=decode_slots, **shapes)
                  if decode_slots else sampler_plan.compile_rollout(self.model_config, self.mesh, **shapes))
        last = None  # this call's previous program
        while True:
            t0 = time.perf_counter()
            try:
                name, compiled = next(phases)
            except StopIteration:
                return
            except Exception as e:  # the TPU compiler refuses programs that exceed HBM
                if not _out_of_memory(e):
                    raise
                where = f"after_{label}_{last}" if last else "at_prefill"
                self.phases.append(Phase(f"{label}_failed_{where}", 0, 0, 0, 0, 0,
                                         self.opt_bytes, time.perf_counter() - t0, error=_first_line(e)))
                return
            dt = time.perf_counter() - t0
            out_bytes = _bytes_per_chip(compiled.out_info)
            if name == "prefill":
                resident = self.opt_bytes
            elif name == "decode_weights":
                resident = self.opt_bytes + state_bytes + prefix_bytes
            elif name == "start":
                resident = self.opt_bytes + params_bytes + weights_bytes
            elif name.startswith("grow_"):
                layers = self.model_config.num_layers
                m = compiled.memory_analysis()  # one layer's buffer in, the grown buffer out
                old, out_bytes = int(m.argument_size_in_bytes), int(m.output_size_in_bytes)
                if name.startswith("grow_k"):
                    grown_k = layers * (out_bytes - old)
                    others = state_bytes - old + (layers - 1) * (out_bytes - old)
                else:
                    others = state_bytes + grown_k - old + (layers - 1) * (out_bytes - old)
                resident = self.opt_bytes + params_bytes + weights_bytes + prefix_bytes + others
            else:
                # decode / phase: the decode weights and the sampler state are its arguments. The params are not:
                # the loop reads only the decode weights, and jit drops unused arguments (keep_unused=False), so
                # its argument bytes leave out the params that the train state keeps alive.
                resident = self.opt_bytes + params_bytes
            last = name.replace('@', '_')
            self._record(f"{label}_{last}", compiled, resident, dt)
            if name == "prefill" and decode_slots:
                prefix_bytes = out_bytes
            elif name == "prefill":
                state_bytes = out_bytes
            elif name == "decode_weights":
                weights_bytes = out_bytes
            elif name == "start" or name.startswith(("decode@", "phase@")):
                state_bytes, grown_k = out_bytes, 0

    def _rollout_slots(self) -> int | None:
        """rollout.decode_slots, `auto` resolved by the trainer's rule with the chip's usable HBM less the resident
        train state free; None (and a failed row) when not one slot fits, where the trainer would stop."""
        from lad_jax import decode_memory
        from lad_jax.train_step import full_params

        c = self.c
        if c.rollout.decode_slots != "auto":
            return c.rollout.decode_slots
        free = None if self.limit is None else self.limit - _bytes_per_chip(self.state) - self.ref_bytes
        try:
            self.decode_choice = decode_memory.for_rollout(c, self.model_config, self.mesh, free,
                                                           full_params(self.state))
        except ValueError as e:
            self.phases.append(Phase("rollout_decode_slots", 0, 0, 0, 0, 0, self.opt_bytes, 0.0, error=str(e)))
            return None
        self.log(self.decode_choice.describe())
        return self.decode_choice.slots

    def run_all(self, groups=GROUPS):
        from lad_jax.experience import prompt_bucket

        c = self.c
        if "train_step" in groups:
            self.train_step()
        # the reference log-probs (algorithm.kl_coef > 0) run the same program on the frozen params
        if (c.rollout.old_logprobs == "recompute" or c.algorithm.kl_coef > 0) and "recompute" in groups:
            self.recompute()
        from lad_jax.sampling import Sampling

        r = c.rollout
        slots = self._rollout_slots() if "rollout" in groups else None
        if slots is not None:
            self.generate("rollout", r.prompts_per_step, r.num_samples, prompt_bucket(c), r.max_new_tokens,
                          Sampling(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p), slots)
        if c.eval.enabled and "eval" in groups:
            from lad_jax.sampler import bucket_length
            # the trainer's eval: min(#eval rows, 64) prompts per generate call, prompts bucketed to >= 16 slots
            self.generate("eval", min(c.eval.max_prompts, 64), c.eval.num_samples,
                          bucket_length(c.data.max_prompt_tokens, 16), r.max_new_tokens,
                          Sampling(temperature=c.eval.temperature))
        return self.phases


# ---- command line ------------------------------------------------------------------------------------------------
def plan(c, devices, *, hbm_gib: float | None = None, log=lambda msg: None, groups=GROUPS) -> dict[str, Any]:
    """Compile every phase of config `c` for `devices`; returns the report dict (`--json` prints it)."""
    from lad_jax.config import check_devices
    from lad_jax.sharding import make_mesh

    from lad_jax.models.attention import target_platform

    platform = devices[0].platform
    shape = check_devices(c, len(devices), platform)
    mesh = make_mesh(*shape, devices=devices)
    limit = usable_hbm_bytes(devices, hbm_gib)
    with target_platform(platform):  # model.attention=auto picks the target's kernels (splash on TPU)
        planner = Planner(c, mesh, log, limit)
        phases = planner.run_all(groups)
    rows = []
    for p in phases:
        fits = None if limit is None and p.error is None else (p.error is None and p.total_bytes <= limit)
        rows.append({**dataclasses.asdict(p), "total_bytes": p.total_bytes, "fits": fits})
    verdicts = [r["fits"] for r in rows]
    return {
        "devices": len(devices), "device_kind": devices[0].device_kind, "platform": devices[0].platform,
        "mesh": dict(zip(("data", "fsdp", "tensor"), shape)),
        "usable_hbm_bytes": limit,
        "train_state_bytes": _bytes_per_chip(planner.state),
        "optimizer_state_bytes": _bytes_per_chip(planner.state["opt_state"]),
        "decode_slots_auto": None if planner.decode_choice is None else planner.decode_choice.describe(),
        "phases": rows,
        "fits": None if None in verdicts else all(verdicts),
    }


def _unit(report) -> tuple[str, int]:
    """GiB for real models, MiB when every phase is below 1 GiB (tiny test configs)."""
    largest = max(p["total_bytes"] for p in report["phases"])
    return ("GiB", GIB) if largest >= GIB else ("MiB", 1024 ** 2)


def format_report(report: dict[str, Any]) -> str:
    mesh = " x ".join(f"{k} {v}" for k, v in report["mesh"].items())
    limit = report["usable_hbm_bytes"]
    unit, scale = _unit(report)

    def num(n) -> str:
        return f"{n / scale:9.3f}"

    lines = [f"{report['devices']} x {report['device_kind']} ({report['platform']}), mesh {mesh}; per chip, {unit}; "
             f"usable HBM {'unknown' if limit is None else f'{limit / scale:.2f}'}; "
             f"train state {report['train_state_bytes'] / scale:.3f} "
             f"(optimizer {report['optimizer_state_bytes'] / scale:.3f})",
             f"{'phase':<22}{'args':>9}{'outputs':>9}{'alias':>9}{'temps':>9}{'peak':>9}{'+state':>9}{'total':>9}"
             f"{'compile_s':>10}  verdict"]
    for p in report["phases"]:
        verdict = "" if p["fits"] is None else "FITS" if p["fits"] else "DOES NOT FIT"
        if p["error"]:
            why = "not compiled" if p["name"] == "rollout_decode_slots" else "compiler refused"
            lines.append(f"{p['name']:<22}{why:>63}{p['compile_s']:10.1f}  {verdict}: {p['error']}")
            continue
        lines.append(f"{p['name']:<22}{num(p['argument_bytes'])}{num(p['output_bytes'])}{num(p['alias_bytes'])}"
                     f"{num(p['temp_bytes'])}{num(p['peak_bytes'])}{num(p['resident_bytes'])}"
                     f"{num(p['total_bytes'])}{p['compile_s']:10.1f}  {verdict}")
    if report["decode_slots_auto"]:
        lines.append(report["decode_slots_auto"])
    worst = max(report["phases"], key=lambda p: p["total_bytes"])
    overall = ("no HBM limit for these devices (pass --hbm-gib)" if report["fits"] is None
               else "FITS" if report["fits"] else "DOES NOT FIT")
    lines.append(f"largest: {worst['name']} {worst['total_bytes'] / scale:.3f} {unit} per chip -> {overall}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lad_jax.plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="trainer config YAML (default: configs/default.yaml)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--topology", help=f"TPU slice to compile for (needs libtpu): {', '.join(TOPOLOGIES)}")
    where.add_argument("--devices", type=int, help="compile for N fake CPU devices")
    p.add_argument("--hbm-gib", type=float, default=None,
                   help="usable memory per chip to check against (default: the TPU chip's HBM; none on CPU)")
    p.add_argument("--phases", default=",".join(GROUPS),
                   help=f"comma-separated phase groups to compile (default: all of {','.join(GROUPS)})")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.devices is not None:
        if args.devices < 1:
            raise SystemExit("error: --devices must be >= 1")
        # XLA reads the fake device count when the CPU backend starts, which has not happened yet in this process.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}").strip()
        os.environ["JAX_PLATFORMS"] = "cpu"
    else:
        # Compile-only: no TPU is opened, so another libtpu process (a second plan, a test) need not block this one.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import jax

    from lad_jax.config import ConfigError, load_config
    groups = tuple(g for g in args.phases.split(",") if g)
    if not groups or set(groups) - set(GROUPS):
        print(f"error: --phases {args.phases!r}: use a comma-separated subset of {','.join(GROUPS)}", file=sys.stderr)
        return 2
    try:
        if args.topology is not None:
            devices = topology_devices(args.topology)
        else:
            devices = jax.devices("cpu")
            if len(devices) < args.devices:
                raise PlanError(f"--devices {args.devices}: this process already started JAX with {len(devices)} "
                                "CPU devices; run python -m lad_jax.plan in a fresh process")
            devices = devices[: args.devices]
        c = load_config(args.config, args.overrides)
        report = plan(c, devices, hbm_gib=args.hbm_gib, groups=groups,
                      log=lambda msg: print(f"plan: {msg}", file=sys.stderr, flush=True))
    except (PlanError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 3 if report["fits"] is False else 0


if __name__ == "__main__":
    sys.exit(main())
