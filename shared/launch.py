"""Run any paper's `train.py` on Slurm through submitit, or through submitit's local executor.

    python -m shared.launch barlow/train.py --nodes 4 --gpus-per-node 8 --partition P --timeout-min 4320 \\
        -- --config barlow/configs/in1k_1000ep.yaml data.root=/datasets/imagenet
    python -m shared.launch barlow/train.py --local --tasks-per-node 2 -- --config barlow/configs/demo.yaml

The transfer entries run the same way (shared/transfer/README.md):

    python -m shared.launch shared/transfer/detection.py --nodes 1 --gpus-per-node 8 --partition P \\
        -- --config shared/transfer/configs/detectron2/voc0712_r50_c4_24k.yaml --weights r50.pkl --out-dir runs/voc

Everything after `--` is the training command line, unchanged. The config is resolved here, before
anything is submitted (unknown keys, missing files and a global batch that the world size does not
divide fail at once), and the job gets an absolute `train.out_dir`, so every attempt of the job
writes to the same folder.

Inside the job each task exports RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from
submitit's JobEnvironment (master: the first host of the allocation; port: derived from the job
id) and runs `train.py` as `__main__`, which initialises NCCL (GPU) or gloo (CPU) as under torchrun.

Requeue: on timeout or preemption Slurm signals the tasks, submitit calls `Trainer.checkpoint()` on
global rank 0, and the job is requeued with the same arguments. The new attempt resumes from
`<out_dir>/last.pt`, the newest complete checkpoint (the engine writes it atomically), at its global
step. A run that has finished (`done.json`) is not requeued; neither is one that has been requeued
`--max-requeues` times. Each attempt is logged in `<out_dir>/launch.jsonl`.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import json
import os
import runpy
import shlex
import socket
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from shared.config import parse_command_line, build_config, to_yaml
from shared.dist import DistEnv, port_from_job_id
from shared.engine import global_batch, output_dir
from shared.pretrain import DONE
from shared.errors import UserError, cli_main
from shared.optim import scaled_lr

LAUNCH_LOG = "launch.jsonl"


# ----------------------------------------------------------------------------------- in the job
def dist_env_from_job(job_env: Any) -> DistEnv:
    """Rank, local rank, world size and rendezvous address of this task from a submitit
    JobEnvironment (Slurm or local). Every task of a job computes the same address and port."""
    local = job_env.cluster == "local"
    return DistEnv(rank=job_env.global_rank, world_size=job_env.num_tasks, local_rank=job_env.local_rank,
                   master_addr="127.0.0.1" if local else job_env.hostnames[0],
                   master_port=int(os.environ.get("MASTER_PORT", port_from_job_id(job_env.job_id))),
                   source="submitit")


@dataclass
class Trainer:
    """The submitted callable: runs `script` with `args` in every task; picklable, and requeued
    as a copy of itself with `attempt + 1`."""
    script: str                 # absolute path of <paper>/train.py (or of a transfer entry)
    args: List[str]             # its command line
    out_dir: str                # absolute train.out_dir, shared by every attempt
    max_requeues: int
    attempt: int = 0            # 0 for the first run, k after k requeues
    done_file: str = DONE       # written into out_dir when the run has finished

    def __call__(self) -> None:
        import submitit
        job_env = submitit.JobEnvironment()
        env = dist_env_from_job(job_env)
        os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                          MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
        if "OMP_NUM_THREADS" not in os.environ:   # as torchrun: no oversubscription by the tasks of a node
            import torch
            per_node = max(1, env.world_size // max(1, job_env.num_nodes))
            cpus = os.environ.get("SLURM_CPUS_PER_TASK") or max(1, (os.cpu_count() or 1) // per_node)
            torch.set_num_threads(int(cpus))
        if env.rank == 0:
            last = Path(self.out_dir) / "last.pt"
            self._log(job_env.job_id, "start", world_size=env.world_size, master=f"{env.master_addr}:{env.master_port}",
                      resume_from=str(last) if last.is_file() else None)
        sys.argv = [self.script, *self.args]
        runpy.run_path(self.script, run_name="__main__")

    def checkpoint(self) -> Optional[Any]:
        """Called by submitit on global rank 0 when the job is signalled (timeout or preemption)."""
        from submitit import JobEnvironment
        from submitit.helpers import DelayedSubmission
        job_id = JobEnvironment().job_id
        if (Path(self.out_dir) / self.done_file).is_file():
            self._log(job_id, "finished, not requeued")
            return None
        if self.attempt >= self.max_requeues:
            self._log(job_id, f"not requeued: --max-requeues {self.max_requeues} reached")
            return None
        self._log(job_id, f"requeued ({self.attempt + 1} of at most {self.max_requeues})")
        return DelayedSubmission(replace(self, attempt=self.attempt + 1))

    def _log(self, job_id: str, event: str, **extra: Any) -> None:
        record = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "job_id": job_id, "attempt": self.attempt,
                  "host": socket.gethostname(), "event": event, **extra}
        print(f"[launch] {json.dumps(record)}", flush=True)
        out = Path(self.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / LAUNCH_LOG, "a") as f:
            f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------ at submission
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:   # one line, through cli_main
        raise UserError(f"python -m shared.launch: {message}")


def build_parser() -> _Parser:
    p = _Parser(prog="python -m shared.launch", allow_abbrev=False,
                description="Submit <paper>/train.py to Slurm (or run it with submitit's local executor).",
                usage="python -m shared.launch <paper>/train.py [options] -- --config <recipe>.yaml [key=value ...]")
    p.add_argument("script", help="a paper's train.py, e.g. barlow/train.py")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs per node (default 8 on Slurm, 0 with --local); one task per GPU")
    p.add_argument("--tasks-per-node", type=int, default=None,
                   help="processes per node (default: --gpus-per-node, or 1 without GPUs)")
    p.add_argument("--partition")
    p.add_argument("--timeout-min", type=float, default=4320)
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--constraint")
    p.add_argument("--comment")
    p.add_argument("--exclude", help="nodes to avoid (Slurm host list)")
    p.add_argument("--mem-per-gpu", help="e.g. 40G")
    p.add_argument("--cpus-per-task", type=int, default=10)
    p.add_argument("--signal-delay-s", type=int, default=120,
                   help="how long before the time limit Slurm signals the job (to requeue it)")
    p.add_argument("--max-requeues", type=int, default=10)
    p.add_argument("--job-name")
    p.add_argument("--setup", action="append", default=[], metavar="CMD",
                   help="shell line run before the job (e.g. 'module load cuda'); repeatable")
    p.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. --slurm gres=gpu:8; repeatable")
    p.add_argument("--local", action="store_true",
                   help="run on this machine through submitit's local executor (one node) and wait for it")
    p.add_argument("--dry-run", action="store_true", help="print the job parameters and resolved config; submit nothing")
    return p


def split_argv(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    argv = list(argv)
    if "--" not in argv:
        raise UserError("python -m shared.launch: put the training command line after `--`, e.g. "
                        "`python -m shared.launch barlow/train.py --local -- --config barlow/configs/demo.yaml`")
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def parse_launcher_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        options = [o for a in parser._actions for o in a.option_strings]
        bad = unknown[0]
        near = difflib.get_close_matches(bad.split("=")[0], options, n=3)
        hint = f"; did you mean {' or '.join(near)}?" if near else f"; valid options: {' '.join(options)}"
        raise UserError(f"python -m shared.launch: unknown option {bad!r}{hint} "
                        f"(options for the training script go after `--`)")
    for name in ("nodes", "max_requeues", "cpus_per_task"):
        if getattr(args, name) < (1 if name != "max_requeues" else 0):
            raise UserError(f"python -m shared.launch: --{name.replace('_', '-')} must be positive")
    if args.gpus_per_node is None:
        args.gpus_per_node = 0 if args.local else 8
    if args.tasks_per_node is None:
        args.tasks_per_node = max(args.gpus_per_node, 1)
    if args.local and args.nodes != 1:
        raise UserError("python -m shared.launch: --local runs on one node; drop --nodes")
    if not args.local and not args.dry_run and not args.partition:
        raise UserError("python -m shared.launch: --partition is required for Slurm (or use --local / --dry-run)")
    return args


@dataclass
class Plan:
    """What will be submitted: the resolved config (None for a transfer entry) and the job's arguments."""
    method: str
    script: Path
    train_args: List[str]
    out_dir: Path
    world: int
    cfg: Any
    done_file: str = DONE


TRANSFER_ENTRIES = ("detection.py", "segmentation.py")   # in shared/transfer/


def is_transfer_entry(script: Path) -> bool:
    return script.name in TRANSFER_ENTRIES and script.parent == Path(__file__).resolve().parent / "transfer"


def plan_transfer_job(script: Path, train_argv: Sequence[str], world: int) -> Plan:
    """A transfer entry checks its own command line (`launch_args`, which imports neither detectron2
    nor mmseg): it returns the absolute output folder and the arguments of every attempt, with
    `--resume`, so that a requeued job continues from its newest checkpoint."""
    module = importlib.import_module(f"shared.transfer.{script.stem}")
    out_dir, job_args, done_file = module.launch_args(train_argv)
    return Plan(f"transfer-{script.stem}", script, job_args, Path(out_dir), world, None, done_file)


def plan_job(args: argparse.Namespace, train_argv: Sequence[str]) -> Plan:
    script = Path(args.script).resolve()
    if script.is_file() and is_transfer_entry(script):
        return plan_transfer_job(script, train_argv, args.nodes * args.tasks_per_node)
    if not script.is_file() or script.name != "train.py":
        raise UserError(f"python -m shared.launch: {args.script} is not a paper's train.py (e.g. barlow/train.py) "
                        f"nor a transfer entry (shared/transfer/detection.py, shared/transfer/segmentation.py)")
    method = script.parent.name
    try:
        module = importlib.import_module(f"{method}.train")
    except ImportError as exc:
        raise UserError(f"python -m shared.launch: cannot import {method}.train ({exc}); is the project installed "
                        f"(`make install`)?") from None
    if not hasattr(module, "Config"):
        raise UserError(f"python -m shared.launch: {method}/train.py defines no `Config`")
    cl = parse_command_line(train_argv)
    if not cl.config:
        raise UserError("python -m shared.launch: the training command line needs --config <recipe>.yaml")
    configs = [str(Path(c).resolve()) for c in cl.config]
    cfg = build_config(module.Config, configs, cl.overrides)
    world = args.nodes * args.tasks_per_node
    cfg.train.batch_size = global_batch(cfg.train, world)
    out_dir = output_dir(cfg, method).resolve()
    cfg.train.out_dir = str(out_dir)
    overrides = [o for o in cl.overrides if not o.startswith("train.out_dir=")]
    train_args = [a for c in configs for a in ("--config", c)] + overrides + [f"train.out_dir={out_dir}"]
    return Plan(method, script, train_args, out_dir, world, cfg)


def slurm_parameters(args: argparse.Namespace, plan: Plan) -> Dict[str, Any]:
    params: Dict[str, Any] = dict(
        job_name=args.job_name or f"{plan.method}-{(plan.cfg.name if plan.cfg else '') or 'run'}", nodes=args.nodes,
        ntasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task,
        time=int(args.timeout_min), signal_delay_s=args.signal_delay_s)
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    for key in ("partition", "account", "qos", "constraint", "comment", "exclude", "mem_per_gpu"):
        if getattr(args, key):
            params[key] = getattr(args, key)
    if args.setup:
        params["setup"] = list(args.setup)
    extra = {}
    for item in args.slurm:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"python -m shared.launch: --slurm expects KEY=VALUE, got {item!r}")
        extra[key.replace("-", "_")] = value
    if extra:
        params["additional_parameters"] = extra
    return params


def local_parameters(args: argparse.Namespace) -> Dict[str, Any]:
    params: Dict[str, Any] = dict(tasks_per_node=args.tasks_per_node, gpus_per_node=args.gpus_per_node,
                                  timeout_min=args.timeout_min, signal_delay_s=args.signal_delay_s)
    if args.setup:
        params["setup"] = list(args.setup)
    return params


def make_executor(args: argparse.Namespace, plan: Plan):
    import submitit
    folder = plan.out_dir / "submitit"
    if args.local:
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=args.max_requeues)
        executor.update_parameters(**local_parameters(args))
    else:
        executor = submitit.SlurmExecutor(folder=folder / "%j", max_num_timeout=args.max_requeues)
        executor.update_parameters(**slurm_parameters(args, plan))
    return executor


def describe(args: argparse.Namespace, plan: Plan) -> str:
    cfg = plan.cfg
    head = f"{plan.method}: {plan.world} process(es) = {args.nodes} node(s) x {args.tasks_per_node} task(s)"
    if cfg is not None:
        lr = scaled_lr(cfg.optim.lr, cfg.train.batch_size, cfg.optim.lr_ref_batch)
        head += f"; global batch {cfg.train.batch_size} = {cfg.train.batch_size // plan.world} per process; peak lr {lr:g}"
    lines = [head,
             f"output: {plan.out_dir}",
             f"command in each task: {shlex.join([sys.executable, str(plan.script), *plan.train_args])}"]
    return "\n".join(lines)


def dry_run(args: argparse.Namespace, plan: Plan) -> None:
    print(describe(args, plan))
    if args.local:
        print("submitit local executor parameters: " + json.dumps(local_parameters(args)))
    else:
        params = slurm_parameters(args, plan)
        print("submitit Slurm parameters: " + json.dumps(params))
        try:       # the sbatch file submitit would write (a private helper: best effort)
            from submitit.slurm.slurm import _make_sbatch_string
            text = _make_sbatch_string(command="<submitit job command>", folder=str(plan.out_dir / "submitit" / "%j"),
                                       **params)
            print("sbatch header:\n" + "\n".join(l for l in text.splitlines() if l.startswith("#SBATCH")))
        except Exception as exc:   # noqa: BLE001 - informative only
            print(f"(sbatch text unavailable: {exc})")
    if plan.cfg is not None:
        print("resolved config:")
        print(to_yaml(plan.cfg), end="")


def submit(args: argparse.Namespace, plan: Plan):
    executor = make_executor(args, plan)
    trainer = Trainer(script=str(plan.script), args=plan.train_args, out_dir=str(plan.out_dir),
                      max_requeues=args.max_requeues, done_file=plan.done_file)
    job = executor.submit(trainer)
    print(describe(args, plan))
    print(f"job id: {job.job_id}")
    print(f"logs (task 0): {job.paths.stdout} and {job.paths.stderr}; task k writes {job.job_id}_k_log.*")
    print(f"attempts: {plan.out_dir / LAUNCH_LOG}")
    return job


@cli_main
def main(argv: Optional[Sequence[str]] = None) -> None:
    launcher_argv, train_argv = split_argv(sys.argv[1:] if argv is None else argv)
    args = parse_launcher_args(launcher_argv)
    plan = plan_job(args, train_argv)
    if args.dry_run:
        dry_run(args, plan)
        return
    job = submit(args, plan)
    if args.local:
        print("waiting for the local job (Ctrl-C cancels it) ...", flush=True)
        try:
            job.results()
        except KeyboardInterrupt:
            job.cancel()
            raise
        except Exception as exc:   # submitit wraps the task's failure; its log has the traceback
            raise UserError(f"local job {job.job_id} failed: {str(exc).strip().splitlines()[-1]} "
                            f"(log: {job.paths.stderr})") from None
        print(f"local job {job.job_id} finished: {plan.out_dir}")


if __name__ == "__main__":
    main()
