"""The RL loop: rollout -> rewards -> advantages -> mu passes of minibatch updates -> metrics -> checkpoint.

Resume is exact: the rollout RNG and the minibatch shuffle are pure functions of (seed, step), and a checkpoint
holds params, optimizer state, step, the data-iterator position and the run's pre-training eval, so re-running
the same command continues where the last checkpoint left off and reproduces the uninterrupted run.

Determinism: identical commands on one machine give bit-identical metrics.jsonl and weights, with XLA:CPU's default
multi-threaded Eigen or with --xla_cpu_multi_thread_eigen=false (the two even agree), and also while busy loops load
every core: `tests/test_train_resume.py` resumes a killed run beside them and compares with a quiet uninterrupted run
bit for bit, and the default run's 41 metrics lines were identical with 3 busy loops beside it (2-core machine, jax
0.10.2). Results still differ in the last bits between machines with different thread counts or CPUs, between XLA
flag settings or jax versions, and between mesh layouts (a cross-device gradient sum is ordered differently in-process
and over gloo; see tests/test_multihost.py).

Several processes (`lad_jax/distributed.py`): the number of hosts is invisible to the math. Every host runs the same
global data iterator and so holds the same prompt batch; the sampler, the recompute and the train step each run once
over the global mesh on global arrays built from that host data (each device takes its own rows), and their results
come back whole to every host, so minibatches, advantages and metrics are global and identical everywhere. Each host
scores a share of the rows. The checkpoint's data-iterator state is therefore every host's; evaluation samples each
prompt once over the whole mesh; the HF export gathers on all hosts and process 0 writes; the SIGTERM stop decision
is all-gathered (`agreed_stop`) so that every host takes part in the same final, collective checkpoint save.
"""
from __future__ import annotations

import functools
import json
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from lad_jax import distributed, experience, run_files, sampler
from lad_jax import train_setup as setup_lib
from lad_jax.checkpoint import CheckpointError, CheckpointManager, install_preemption_handler
from lad_jax.config import Config
from lad_jax.metrics_log import MetricsWriter, WandbOptions
from lad_jax.models import lora
from lad_jax.tasks import get_task
from lad_jax.train_step import (TrainStep, batch_sharding, checkpointed, full_params, init_train_state,
                                make_logprob_fn)

_NEVER = 10**9


def agreed_stop(local_flag: bool, *, process_count: int | None = None, allgather=None) -> bool:
    """Whether any process saw SIGTERM: every host must take the same branch after a step, because the final
    save is a collective (a host that stops while another trains on would hang both).

    Single-process runs return the local flag without any communication; with several processes each host's flag
    is all-gathered (one int32 per host, once per step) and OR-ed. `allgather` is injectable for tests.
    """
    count = jax.process_count() if process_count is None else process_count
    if count <= 1:
        return bool(local_flag)
    if allgather is None:
        from jax.experimental import multihost_utils

        allgather = multihost_utils.process_allgather
    flags = np.asarray(allgather(np.asarray([int(bool(local_flag))], np.int32)))
    return bool(flags.any())


def finished_summary(c: Config) -> dict[str, Any] | None:
    """The run's summary.json when it already finished `c.steps` steps (re-running it then changes nothing)."""
    text = run_files.read_text(run_files.join(c.run_dir, "summary.json"))
    if text is None:
        return None
    try:
        summary = json.loads(text)
    except ValueError:
        return None
    return summary if summary.get("steps") == c.steps else None


class Trainer:
    def __init__(self, config: Config, *, log=functools.partial(print, flush=True)):
        self.c = config
        self.s = setup_lib.build(config)  # starts jax.distributed first: no JAX call may come before it
        self.log = log if jax.process_index() == 0 else (lambda *a, **k: None)
        s = self.s
        self.step_fn = TrainStep(config, s.graphdef, s.tx, s.schedule, s.mesh, s.shardings)
        self.recompute = None
        self.reference = None  # reference-policy log-probs, only with the KL term (algorithm.kl_coef > 0)
        self.ref_params = None  # that policy: a frozen copy of all the params before RL, sharded like them
        if config.rollout.old_logprobs == "recompute" or config.algorithm.kl_coef > 0:
            fn = make_logprob_fn(s.graphdef, s.mesh, full_params(s.shardings), config.rollout.temperature,
                                 config.model.logprob_chunk_size)
            if config.rollout.old_logprobs == "recompute":
                self.recompute = functools.partial(self._recompute, fn)
            if config.algorithm.kl_coef > 0:
                self.reference = functools.partial(self._recompute, fn, reference=True)
        self.ckpt = CheckpointManager(config.checkpoint_dir, save_every=config.checkpoint.every or _NEVER,
                                      keep_last=config.checkpoint.keep)
        self.loader = s.loader
        self.eval_rows = s.eval_rows
        st = self.loader.stats
        if st["bad_rows"] or st["dropped_too_long"]:
            self.log(f"data: skipped {st['bad_rows']} bad rows (data.on_bad_row=skip) and {st['dropped_too_long']} "
                     f"prompts longer than data.max_prompt_tokens={config.data.max_prompt_tokens}; "
                     f"training on {st['kept']} prompts")
        self.state = None
        self.decode_slots: int | None = None  # rollout.decode_slots, resolved before the first rollout
        self.eval_before: dict[str, float] | None = None

    def _recompute(self, fn, tokens_bt, positions_bt, valid_bt, *, reference: bool = False):
        """pi_old (or, with `reference`, pi_ref) log-probs of the global rollout (host arrays in, the whole host
        array out on every process)."""
        rows = batch_sharding(self.s.mesh, 2, lead=0)
        arrays = [distributed.global_array(a, rows) for a in (tokens_bt, positions_bt, valid_bt)]
        with jax.set_mesh(self.s.mesh):
            out = fn(self.ref_params if reference else full_params(self.state), *arrays)
        return distributed.to_host(out)

    # ---- state -----------------------------------------------------------------------------------------
    def policy(self):
        """An nnx model view of the current params (no copy): sampling and training share the arrays."""
        return nnx.merge(self.s.graphdef, full_params(self.state))

    def _abstract_state(self):
        """The checkpointed part of the train state, abstract (what a restore fills in)."""
        shapes = jax.eval_shape(lambda p: init_train_state(self.s.tx, p, self.s.shardings), self.s.params)
        return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), checkpointed(shapes),
                            checkpointed(self.s.shardings))

    def _restore(self):
        """(step, train state, meta) of the newest checkpoint, or None; the frozen LoRA base comes from the setup."""
        restored = self.ckpt.restore_latest(self._abstract_state(), log=self.log)
        if restored is None:
            return None
        step, state, meta = restored
        if "frozen" in self.s.shardings:
            state["frozen"] = lora.split_params(self.s.params, True)[1]
        return step, state, meta

    def _restore_or_init(self) -> int:
        c = self.c
        restored = self._restore() if c.checkpoint.resume else None
        if restored is not None:
            step, self.state, meta = restored
            self.loader.set_state(meta["data"])
            self.eval_before = meta.get("eval_before")
            self.log(f"resumed from {c.checkpoint_dir} at step {step}")
            if c.algorithm.kl_coef > 0:  # not checkpointed: rebuilt as the fresh run built it (see DESIGN.md)
                self.ref_params = self._frozen_copy(self._initial_params())
            return int(step)
        params = self._initial_params()
        if c.algorithm.kl_coef > 0:
            self.ref_params = self._frozen_copy(params)
        self.state = init_train_state(self.s.tx, params, self.s.shardings)
        return 0

    def _frozen_copy(self, params):
        """Own buffers: the train state's params are donated to each step, so the reference may not share them. A
        frozen LoRA base is never donated: the reference shares it and copies only the adapters."""
        trainable, frozen = lora.split_params(params, "frozen" in self.s.shardings)
        sh = self.s.shardings["params"]
        copy = jax.jit(lambda p: jax.tree.map(jax.numpy.copy, p), in_shardings=(sh,), out_shardings=sh)(trainable)
        return lora.merge_params(frozen, copy)

    def _initial_params(self):
        """The policy before RL (init_from or the seeded scratch init, then the task's warm start, if any): a pure
        function of the config, so a resumed run rebuilds the same reference policy."""
        c = self.c
        params = self.s.params
        task = get_task(c.task.name)
        t0 = time.perf_counter()
        warm = None if task is None or task.warm_start is None else task.warm_start(
            self.s.graphdef, params, self.s.tokenizer, c.task, c.seed, self.log)
        if warm is not None:
            params, loss = warm
            self.log(f"warm-start done in {time.perf_counter() - t0:.1f}s (loss {loss:.3f})")
            params = jax.tree.map(distributed.global_array, params, full_params(self.s.shardings))  # host -> mesh
        return params

    def _meta(self) -> dict[str, Any]:
        return {"data": self.loader.get_state(), "eval_before": self.eval_before, "config": self.c.to_dict()}

    # ---- eval ------------------------------------------------------------------------------------------
    def evaluate(self, step: int) -> dict[str, float]:
        from lad_jax.evaluate import evaluate_policy

        c = self.c
        if not self.eval_rows:
            return {}
        k = c.eval.num_samples
        summary, samples = evaluate_policy(
            self.policy(), self.s.tokenizer, self.eval_rows, self.s.reward_fn, num_samples=k,
            max_new_tokens=c.rollout.max_new_tokens, temperature=c.eval.temperature, seed=c.seed + 1,
            use_chat_template=c.data.use_chat_template, system_prompt=c.data.system_prompt,
            prompts_per_batch=min(len(self.eval_rows), 64), stop_token_ids=self.s.stop_ids,
            pad_id=self.s.tokenizer.pad_token_id, ks=(1, k), ngram=c.eval.ngram,
            correct_threshold=c.reward.correct_threshold, mesh=self.s.mesh)
        if jax.process_index() == 0:
            run_files.write_text(run_files.join(c.run_dir, f"eval_step{step}.json"),
                                 json.dumps({"step": step, "summary": summary, "samples": samples[:8]}, indent=1))
        return summary

    def reevaluate(self) -> dict[str, float]:
        """Evaluates the newest checkpoint again, as the run's final eval did (asked for with `--reevaluate` on a
        finished run). Writes only `eval_step<N>.json`; metrics, TensorBoard and summary.json stay as they are."""
        restored = self._restore()
        if restored is None:
            raise CheckpointError(f"--reevaluate: no checkpoint in {self.c.checkpoint_dir} to evaluate; "
                                  f"train first (python -m lad_jax.train without --reevaluate)")
        step, self.state, _ = restored
        ev = self.evaluate(int(step))
        self.ckpt.close()
        self._log_eval(f"step {int(step)}, re-evaluated", ev)
        return ev

    # ---- loop ------------------------------------------------------------------------------------------
    def train_one(self, step: int) -> dict[str, float]:
        """One RL step; returns host metrics of the rollout (train metrics arrive one step late)."""
        c = self.c
        rows = next(self.loader)
        self._resolve_decode_slots()
        t0 = time.perf_counter()
        exp = experience.collect(c, self.policy(), rows, self.s.tokenizer, self.s.reward_fn,
                                 key=setup_lib.step_key(c.seed, step), mesh=self.s.mesh, stop_ids=self.s.stop_ids,
                                 recompute=self.recompute, reference=self.reference, decode_slots=self.decode_slots)
        t1 = time.perf_counter()
        updates = 0
        train_metrics = []
        for mb in experience.minibatches(c, exp, setup_lib.shuffle_rng(c.seed, step)):
            batch = {k: distributed.global_array(v, self.step_fn.batch_shardings[k]) for k, v in mb.items()}
            self.state, m = self.step_fn(self.state, batch)
            train_metrics.append(m)
            updates += 1
        host_metrics = jax.device_get(train_metrics)  # one transfer for all minibatches
        train = {k: float(np.mean([m[k] for m in host_metrics])) for k in host_metrics[0]} if host_metrics else {}
        t2 = time.perf_counter()
        metrics = dict(exp.metrics)
        metrics.update(train)
        total_tokens = float(exp.arrays["valid_bt"].sum()) * c.algorithm.mu
        metrics.update({
            "time/rollout_s": t1 - t0,
            "time/train_s": t2 - t1,
            "time/step_s": t2 - t0,
            "train/updates": float(updates),
            "rollout/decode_slots": float(self.decode_slots),
            "throughput/train_tokens_per_s": total_tokens / max(t2 - t1, 1e-9),
            "throughput/generated_tokens_per_s": metrics["tokens/generated"] / max(metrics["time/generate_s"], 1e-9),
            "compiles/train_step": float(self.step_fn.compiles),
            "compiles/sampler": float(sum(sampler.compile_counts().values())),
            "data/skipped_bad_rows": float(self.loader.stats["bad_rows"]),
            "data/dropped_too_long": float(self.loader.stats["dropped_too_long"]),
        })
        return metrics

    def _resolve_decode_slots(self) -> None:
        """Once, with the train state resident: every rollout of the run then has the same shapes."""
        if self.decode_slots is None:
            choice = experience.resolve_decode_slots(self.c, self.s.model_config, self.s.mesh,
                                                     full_params(self.state))
            self.decode_slots = choice.slots
            if self.c.rollout.decode_slots == "auto":
                self.log(choice.describe())

    def run(self) -> dict[str, Any]:
        c = self.c
        start = self._restore_or_init()
        preempt = install_preemption_handler()
        w = c.logging.wandb
        wandb = WandbOptions(mode=w.mode, project=w.project, entity=w.entity, run_name=w.run_name or c.run_name,
                             config=c.to_dict())
        writer = (MetricsWriter(c.run_dir, tensorboard=c.logging.tensorboard, resume_step=start, wandb=wandb)
                  if jax.process_index() == 0 else None)
        if self.eval_before is None and c.eval.at_start and self.eval_rows:
            self.eval_before = self.evaluate(start)
            self._log_eval("before RL", self.eval_before)
        self._resolve_decode_slots()
        bar = None
        if c.logging.progress_bar and jax.process_index() == 0:
            from tqdm import tqdm

            bar = tqdm(total=c.steps, initial=start, desc=f"{c.algorithm.loss} {c.run_name}", dynamic_ncols=True)
        t_start = time.perf_counter()
        step = start
        stopped_early = False
        try:
            while step < c.steps:
                metrics = self.train_one(step)
                step += 1
                if c.eval.every and step % c.eval.every == 0 and step < c.steps:
                    metrics.update({f"eval/{k}": v for k, v in self.evaluate(step).items()})
                if writer is not None:
                    writer.write(step, metrics)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(acc=f"{metrics['rollout/accuracy']:.2f}",
                                    distinct=f"{metrics['rollout/distinct_frac']:.2f}")
                self.ckpt.save(step, checkpointed(self.state), meta=self._meta())
                if agreed_stop(preempt.is_set()):
                    self.log(f"SIGTERM: saving step {step} and exiting")
                    self.ckpt.save(step, checkpointed(self.state), meta=self._meta(), force=True)
                    stopped_early = True
                    break
        finally:
            if bar is not None:
                bar.close()
            preempt.uninstall()
        if not stopped_early and step > start:
            self.ckpt.save(step, checkpointed(self.state), meta=self._meta(), force=True)
        self.ckpt.wait()
        if stopped_early:
            self.ckpt.close()
            if writer is not None:
                writer.close()
            return {"stopped_at": step}
        summary = self._finish(step, time.perf_counter() - t_start, writer)
        self.ckpt.close()
        return summary

    def _finish(self, step: int, seconds: float, writer) -> dict[str, Any]:
        c = self.c
        after = self.evaluate(step) if self.eval_rows else {}
        if writer is not None:
            if after:
                writer.write(step, {f"eval/{k}": v for k, v in after.items()})
            writer.close()
        if c.checkpoint.export_hf:
            from lad_jax.models import save_pretrained

            if jax.process_index() == 0:
                with run_files.local_dir(run_files.join(c.run_dir, "hf_export")) as export:
                    save_pretrained(self.policy(), export)
                    self.s.tokenizer.save_pretrained(export)
            else:
                save_pretrained(self.policy(), None)  # the gathers are collective; process 0 writes
            if self.s.model_config.lora is not None:  # the adapters alone too, for peft users of init_from
                from lad_jax.models.peft_export import save_peft_adapter

                if jax.process_index() == 0:
                    with run_files.local_dir(run_files.join(c.run_dir, "peft_adapter")) as adapter:
                        save_peft_adapter(self.policy(), adapter, base_model_name_or_path=c.init_from)
                else:
                    save_peft_adapter(self.policy(), None)
        summary = {"steps": step, "rl_seconds": seconds, "eval_before": self.eval_before, "eval_after": after,
                   "compiles_train_step": self.step_fn.compiles, "data": dict(self.loader.stats)}
        if jax.process_index() == 0:
            run_files.write_text(run_files.join(c.run_dir, "summary.json"), json.dumps(summary, indent=1))
        self._log_eval("after RL", after)
        return summary

    def _log_eval(self, label: str, ev: dict[str, float] | None) -> None:
        if not ev:
            return
        k = self.c.eval.num_samples
        self.log(f"[{label}] accuracy (avg@{k}) {ev[f'avg@{k}']:.3f} | pass@{k} {ev[f'pass@{k}']:.3f} | "
                 f"distinct correct answers per prompt {ev['distinct_correct_per_prompt']:.1f} of {k} samples")
