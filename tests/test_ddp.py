"""Data parallel: 2 gloo processes on half batches reproduce one process on the full batch."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from world_model.codec import CodecConfig, FrameCodec
from world_model.ddp import DistInfo, init_distributed, wrap_model
from world_model.dit import ModelConfig, WorldDiT
from world_model.train_codec import Reconstruct
from world_model.train_teacher import TeacherObjective


ROOT = Path(__file__).resolve().parents[1]
MODEL = ModelConfig(latent_channels=4, latent_res=4, patch=2, d_model=32, depth=2, heads=2)
CODEC = CodecConfig(resolution=16, latent_channels=4, downsample=4, base_channels=8)
B, F, W = 4, 4, 2


def _models() -> tuple[TeacherObjective, Reconstruct]:
    torch.manual_seed(0)
    dit = WorldDiT(MODEL)
    with torch.no_grad():  # adaLN-zero starts at 0: perturb so every weight gets a gradient
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return TeacherObjective(dit, F, W), Reconstruct(FrameCodec(CODEC))


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"x0": torch.randn(B, F, 4, 4, 4, generator=g), "controls": torch.randn(B, F, 4, generator=g),
            "t": torch.rand(B, F, generator=g), "eps": torch.randn(B, F, 4, 4, 4, generator=g),
            "weight": torch.tensor([[0, 0, 1, 1]] * 2 + [[1, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.float32),
            "img": torch.rand(B, 3, 16, 16, generator=g) * 2 - 1}


def _losses(teacher: torch.nn.Module, codec: torch.nn.Module, b: dict[str, torch.Tensor],
            n_rolling: int) -> torch.Tensor:
    lt = teacher(b["x0"], b["controls"], b["t"], b["eps"], b["weight"], n_rolling)
    y = codec(b["img"])
    return lt + (y - b["img"]).abs().mean() + (y - b["img"]).pow(2).mean()


def _grads(*modules: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": p.grad.detach().clone() for i, m in enumerate(modules)
            for k, p in m.named_parameters() if p.grad is not None}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = init_distributed("gloo", timeout_minutes=2.0)
    teacher, codec = _models()
    dteacher, dcodec = wrap_model(teacher, info), wrap_model(codec, info)
    half = {k: v[rank * B // 2:(rank + 1) * B // 2] for k, v in _batch().items()}
    # samples 0, 1 use the rolling layout: all of rank 0's half, none of rank 1's
    _losses(dteacher, dcodec, half, n_rolling=2 if rank == 0 else 0).backward()
    save_file(_grads(teacher, codec), f"{out}/grads{rank}.safetensors")
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(out: Path, world: int = 2, timeout: float = 180.0) -> None:
    """Fresh interpreters, not fork: a forked child of a process whose OpenMP pool has run
    can deadlock, and a hung rank must fail the test instead of stalling the suite."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("GLOO_SOCKET_IFNAME", None)  # exercise init_distributed's loopback choice
    procs = [subprocess.Popen([sys.executable, "-c",
                               f"from tests.test_ddp import _worker; _worker({r}, {world}, {port}, {str(out)!r})"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    errors = []
    try:
        for r, p in enumerate(procs):
            _, err = p.communicate(timeout=timeout)
            if p.returncode != 0:
                errors.append(f"rank {r} exited {p.returncode}: {err[-2000:]}")
    except subprocess.TimeoutExpired:
        errors.append(f"DDP workers did not finish within {timeout:.0f} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert not errors, "\n".join(errors)


def test_ddp_two_gloo_processes_match_single_process_gradients(tmp_path: Path) -> None:
    _run_workers(tmp_path)
    teacher, codec = _models()
    assert not isinstance(wrap_model(teacher, DistInfo()), torch.nn.parallel.DistributedDataParallel)
    _losses(teacher, codec, _batch(), n_rolling=2).backward()
    want = _grads(teacher, codec)
    g0, g1 = load_file(str(tmp_path / "grads0.safetensors")), load_file(str(tmp_path / "grads1.safetensors"))
    assert set(g0) == set(want) and len(want) > 20
    for k, v in want.items():
        assert torch.equal(g0[k], g1[k]), k                              # all-reduced: same on both ranks
        torch.testing.assert_close(g0[k], v, rtol=1e-5, atol=1e-5, msg=k)
    # and the halves alone really differ from the full batch (the all-reduce did the work)
    t2, c2 = _models()
    half = {k: v[:2] for k, v in _batch().items()}
    _losses(t2, c2, half, n_rolling=2).backward()
    assert any(not torch.allclose(p, want[k], atol=1e-4) for k, p in _grads(t2, c2).items())


def test_gloo_uses_loopback_for_a_loopback_master(monkeypatch: pytest.MonkeyPatch) -> None:
    from world_model.ddp import _pin_gloo_to_loopback
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    _pin_gloo_to_loopback()
    assert os.environ["GLOO_SOCKET_IFNAME"] in [n for _, n in socket.if_nameindex()]
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")       # an explicit choice is kept
    _pin_gloo_to_loopback()
    assert os.environ["GLOO_SOCKET_IFNAME"] == "eth7"
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    monkeypatch.setenv("MASTER_ADDR", "192.0.2.77")          # a remote master: leave gloo's default
    _pin_gloo_to_loopback()
    assert "GLOO_SOCKET_IFNAME" not in os.environ


def test_world_size_one_needs_no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed() == DistInfo() and DistInfo().is_main and not DistInfo().enabled
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="launch with torchrun"):
        init_distributed()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_torchrun_two_processes_train_and_resume(tmp_path: Path) -> None:
    """The real CLI under torchrun: rank 0 alone writes, both ranks resume."""
    from tests.test_data import write_sessions
    from tests.test_train import _log
    from world_model.checkpoint import save_checkpoint
    from engine.actions import DEFAULT_SCHEMA

    data = tmp_path / "data"
    write_sessions(data, [21, 22, 23], frames=30)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "codec", FrameCodec(CodecConfig(latent_channels=4, base_channels=8)), None,
                    DEFAULT_SCHEMA, (64, 64))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={_free_port()}", "-m", "world_model.train", "stage=teacher", "preset=tiny",
           f"data={data}", f"out={tmp_path / 'run'}", f"codec={tmp_path / 'codec'}",
           "stage.val_clips=4", "stage.val_steps=1", "loop.sample_every=-1"]
    r = subprocess.run(cmd + ["max_steps=3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1 and lines[0]["world_size"] == 2 and lines[0]["steps"] == 3
    r = subprocess.run(cmd + ["max_steps=5"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads([x for x in r.stdout.splitlines() if x.startswith("{")][-1])
    assert s["resumed_from"] == 3 and s["steps"] == 5
    assert [row["step"] for row in _log(tmp_path / "run")] == ["1", "2", "3", "4", "5"]
