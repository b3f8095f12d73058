"""The submitit launcher: rank/address derivation, bad input before submission, the dry run, and
real jobs through submitit's local executor (2 tasks, gloo): equal to torchrun, and a preempted
job that requeues itself and resumes from its last checkpoint."""
from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import submitit
import torch

from shared import dist
from shared.errors import UserError
from shared.launch import LAUNCH_LOG, Trainer, dist_env_from_job, parse_launcher_args, plan_job, submit

from conftest import ROOT, TINY, free_port, run_cli

DEMO = "barlow/configs/demo.yaml"
# 24 steps of 2 x 8 images (about 0.9 s each here), a checkpoint every 2 steps: long enough to interrupt mid-way
STEPS = 24
RUN = [o for o in TINY if not o.startswith("train.epochs")] + [f"train.epochs={STEPS // 4}", "train.ckpt_every_steps=2"]
INTERVAL = 2


@pytest.mark.parametrize("nodes,tasks,rank", [(1, 1, 0), (1, 8, 5), (4, 8, 0), (4, 8, 21)])
def test_rank_world_and_master_from_slurm_environment(monkeypatch, nodes, tasks, rank):
    env = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "123456", "SLURM_NTASKS": str(nodes * tasks),
           "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NODEID": str(rank // tasks), "SLURM_PROCID": str(rank),
           "SLURM_LOCALID": str(rank % tasks),
           "SLURM_JOB_NODELIST": "gpu042" if nodes == 1 else "gpu[007-009],gpu011"}
    for k in [k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_")) or k in ("MASTER_PORT", "RANK")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    got = dist_env_from_job(submitit.JobEnvironment())
    assert (got.rank, got.world_size, got.local_rank) == (rank, nodes * tasks, rank % tasks)
    assert got.master_addr == ("gpu042" if nodes == 1 else "gpu007") and got.master_port == 20000 + 123456 % 20000
    if nodes * tasks > 1:   # a plain `srun python barlow/train.py` derives the same rendezvous
        plain = dist.env_from_environ(env)
        assert (plain.rank, plain.world_size, plain.local_rank, plain.master_addr, plain.master_port) == \
            (got.rank, got.world_size, got.local_rank, got.master_addr, got.master_port)
    else:
        assert dist.env_from_environ(env).world_size == 1


def test_local_environment_uses_loopback(monkeypatch):
    for k, v in {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "4242", "SUBMITIT_LOCAL_NTASKS": "2",
                 "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    got = dist_env_from_job(submitit.JobEnvironment())
    assert (got.rank, got.world_size, got.master_addr, got.master_port) == (1, 2, "127.0.0.1", 24242)


def test_checkpoint_requeues_a_bounded_number_of_times_and_never_a_finished_run(monkeypatch, tmp_path):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "7")
    t = Trainer(script="barlow/train.py", args=[], out_dir=str(tmp_path), max_requeues=2)
    again = t.checkpoint()
    assert again.function.attempt == 1 and again.function.out_dir == t.out_dir
    assert again.function.checkpoint().function.attempt == 2
    assert Trainer("x", [], str(tmp_path), max_requeues=2, attempt=2).checkpoint() is None
    (tmp_path / "done.json").write_text("{}")
    assert t.checkpoint() is None
    events = [json.loads(l)["event"] for l in (tmp_path / LAUNCH_LOG).read_text().splitlines()]
    assert events == ["requeued (1 of at most 2)", "requeued (2 of at most 2)",
                      "not requeued: --max-requeues 2 reached", "finished, not requeued"]


@pytest.mark.parametrize("argv,message", [
    (["--local", "--tasks-per-node", "3", "--", "--config", DEMO, *TINY],
     "train.batch_size=16 (the global batch) is not divisible by the world size 3"),
    (["--local", "--", "--config", "barlow/configs/nope.yaml"], "nope.yaml"),
    (["--partiton", "gpu", "--", "--config", DEMO], "unknown option '--partiton'; did you mean --partition?"),
    (["--local", "--config", DEMO], "put the training command line after `--`"),
    (["--nodes", "2", "--", "--config", DEMO], "--partition is required"),
    (["--local", "--", "--config", DEMO, "train.epoch=3"], "train.epoch"),
])
def test_bad_input_fails_before_submitting(tmp_path, argv, message):
    r = run_cli(["-m", "shared.launch", "barlow/train.py", *argv, f"train.out_dir={tmp_path / 'run'}"]
                if "--" in argv else ["-m", "shared.launch", "barlow/train.py", *argv])
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert not (tmp_path / "run").exists()


def test_dry_run_prints_sbatch_parameters_and_config(tmp_path):
    out = tmp_path / "run"
    r = run_cli(["-m", "shared.launch", "barlow/train.py", "--nodes", "4", "--gpus-per-node", "8", "--partition", "p1",
                 "--account", "acc", "--mem-per-gpu", "40G", "--dry-run", "--", "--config", "barlow/configs/in1k_1000ep.yaml",
                 "data.root=/datasets/imagenet", f"train.out_dir={out}"])
    assert r.returncode == 0, r.stderr
    assert "32 process(es) = 4 node(s) x 8 task(s); global batch 2048 = 64 per process; peak lr 1.6" in r.stdout
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=p1", "#SBATCH --account=acc", "#SBATCH --mem-per-gpu=40G",
                 "#SBATCH --signal=USR2@120", "#SBATCH --time=4320"):
        assert line in r.stdout
    assert f"out_dir: {out}" in r.stdout and "root: /datasets/imagenet" in r.stdout
    assert not out.exists()


@pytest.mark.parametrize("entry, config", [
    ("detection", "shared/transfer/configs/detectron2/voc0712_r50_c4_24k.yaml"),
    ("segmentation", "shared/transfer/configs/mmseg/fcn_d8_r50v1b_voc12aug_512x512_20k.py"),
])
def test_transfer_entries_are_planned_like_train_py(entry, config, tmp_path, monkeypatch):
    """The transfer entries go through the same launcher (their own argument check needs neither
    detectron2 nor mmseg): absolute paths, `--resume` on every attempt, and a run that wrote its
    results.json is not requeued."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.bin").write_bytes(b"x")
    args = parse_launcher_args([str(ROOT / f"shared/transfer/{entry}.py"), "--nodes", "2", "--gpus-per-node", "4",
                                "--partition", "p"])
    plan = plan_job(args, ["--config", str(ROOT / config), "--weights", "w.bin", "--out-dir", "out", "A.B=1"])
    assert plan.cfg is None and plan.world == 8 and plan.out_dir == tmp_path / "out"
    assert "--resume" in plan.train_args and str(tmp_path / "w.bin") in plan.train_args
    assert plan.train_args[-1] == "A.B=1" and plan.done_file == "results.json"
    monkeypatch.setattr(submitit, "JobEnvironment", lambda: type("E", (), {"job_id": "7"})())
    trainer = Trainer(str(plan.script), plan.train_args, str(plan.out_dir), max_requeues=3, done_file=plan.done_file)
    assert trainer.checkpoint() is not None
    (plan.out_dir / "results.json").write_text("{}")
    assert trainer.checkpoint() is None
    with pytest.raises(UserError, match="--config nope.yaml: no such file"):
        plan_job(args, ["--config", "nope.yaml", "--weights", "none", "--out-dir", "out"])


def test_global_batch_or_fixed_per_gpu_batch():
    def plan(*extra, nodes=4):
        args = parse_launcher_args(["barlow/train.py", "--nodes", str(nodes), "--gpus-per-node", "8", "--dry-run"])
        return plan_job(args, ["--config", "barlow/configs/in1k_1000ep.yaml", "data.root=/x", *extra]).cfg
    assert plan().train.batch_size == 2048 and plan(nodes=1).train.batch_size == 2048   # the recipe's global batch
    assert plan("train.per_gpu_batch=128").train.batch_size == 4096                       # grows with the GPUs
    assert plan("train.per_gpu_batch=128", nodes=2).train.batch_size == 2048
    from shared.errors import ConfigError
    for bad, said in (("train.batch_size=0", "the global batch must be >= 1"), ("train.log_every=0", "train.log_every"),
                      ("train.batch_size=-4", "train.batch_size")):   # refused before anything is submitted
        with pytest.raises(ConfigError, match=said):
            plan(bad)
    from shared.optim import param_groups
    from barlow.train import build
    cfg = plan("train.per_gpu_batch=16", "model.backbone.name=resnet18", "model.projector=64-64")
    peak = sorted(g["peak_lr"] for g in param_groups(build(cfg), cfg.optim, cfg.train.batch_size))
    assert peak == pytest.approx([0.0048 * 512 / 256, 0.2 * 512 / 256])               # LR scaled on 16 x 32


def _final_weights(out: Path) -> dict:
    return torch.load(out / "last.pt", weights_only=True)["model"]


def _train_losses(out: Path) -> dict:
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if "loss" in r]
    assert len(steps) == len(set(steps)), "a step is logged twice"
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "run"
    r = run_cli(["-m", "shared.launch", "barlow/train.py", "--local", "--tasks-per-node", "2", "--timeout-min", "10",
                 "--", "--config", DEMO, *RUN, f"train.out_dir={out}"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"job id: \d+", r.stdout) and f"output: {out}" in r.stdout
    return out


# both tests below read the module's one local run: under pytest-xdist (`make test`), one worker runs them
LOCAL_RUN_GROUP = pytest.mark.xdist_group("launch_local_run")


@pytest.mark.slow
@pytest.mark.dist
@LOCAL_RUN_GROUP
def test_local_executor_run_matches_torchrun(local_run, tmp_path):
    out = tmp_path / "torchrun"
    r = run_cli(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                 "barlow/train.py", "--config", DEMO, *RUN, f"train.out_dir={out}"], env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    ref, got = _train_losses(out), _train_losses(local_run)
    assert sorted(got) == sorted(ref) == list(range(STEPS))
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-5, abs=1e-6), s
    a, b = _final_weights(out), _final_weights(local_run)
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6), k
    assert (local_run / "done.json").is_file()
    events = [json.loads(l)["event"] for l in (local_run / LAUNCH_LOG).read_text().splitlines()]
    assert events == ["start"]                     # a run that finishes is not requeued


def _task_pids(controller_pid: int) -> list:
    return [int(p) for p in Path(f"/proc/{controller_pid}/task/{controller_pid}/children").read_text().split()]


@pytest.mark.slow
@pytest.mark.dist
@LOCAL_RUN_GROUP
def test_preempted_local_job_requeues_and_resumes_from_its_last_checkpoint(local_run, tmp_path):
    out = tmp_path / "preempted"
    args = parse_launcher_args(["barlow/train.py", "--local", "--tasks-per-node", "2", "--timeout-min", "10"])
    plan = plan_job(args, ["--config", str(ROOT / DEMO), *RUN, "train.tensorboard=true", f"train.out_dir={out}"])
    job = submit(args, plan)
    deadline, step = time.time() + 300, -1
    while time.time() < deadline and step < 6:
        time.sleep(0.2)
        try:
            step = torch.load(out / "last.pt", weights_only=True)["step"]
        except (FileNotFoundError, RuntimeError, EOFError):
            pass
    assert 6 <= step < STEPS, "the job must be interrupted mid-way for this test to mean anything"
    for pid in _task_pids(job._process.pid):   # what Slurm does before a preemption or the time limit
        os.kill(pid, signal.SIGUSR2)
    job.results()

    log = [json.loads(l) for l in (out / LAUNCH_LOG).read_text().splitlines()]
    assert [(r["attempt"], r["event"]) for r in log] == [(0, "start"), (0, "requeued (1 of at most 10)"), (1, "start")]
    assert log[0]["resume_from"] is None and log[2]["resume_from"] == str(out / "last.pt")
    assert torch.load(out / "last.pt", weights_only=True)["step"] == STEPS

    text = Path(job.paths.stdout).read_text()
    first, _, second = text.partition("resumed from")
    resumed_at = int(re.search(rf"at step (\d+)/{STEPS}", second).group(1))
    ran_before = max(int(s) for s in re.findall(r"\[train step (\d+)\]", first))
    assert step <= resumed_at and ran_before + 1 - resumed_at <= INTERVAL + 1, (resumed_at, ran_before)

    ref, got = _train_losses(local_run), _train_losses(out)
    assert sorted(got) == list(range(STEPS))
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-5, abs=1e-6), s
    a, b = _final_weights(local_run), _final_weights(out)
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6), k
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 2   # one TensorBoard run, two attempts
