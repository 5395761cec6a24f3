"""The training job: a small decoder-only transformer (torch, CPU), resumed from a checkpoint for one step.

    python3 train.py --ckpt /ckpt/model.pt            # a path: a local file or a ckptfs mount
    python3 train.py --ckpt-url http://store/model.pt # one HTTP stream into memory (what a plain download does)

Loads model and optimizer state (``torch.save`` of ``{"config", "model", "optim", "seed", "expected_loss"}``),
runs one training step (forward, backward, AdamW step) on a batch drawn from the checkpoint's seed and prints
``loss=<float>``: the loss of that step, the same for the same checkpoint every time.  Imports the job's
dependencies (requirements.txt) first, as a real job would, so it fails without them.

Phases go to the event log (``$BOOTSEER_EVENTS``, ``$BOOTSEER_JOB_ID``), component ``trainer``: ``imports``
(from the script's start: torch and the dependencies), ``checkpoint_download`` (``--ckpt-url``),
``checkpoint_load`` (the read and ``load_state_dict``) and ``first_step``.  Runs in the job's image, which has torch and
numpy but not BootSeer: stdlib, torch and the requirements only.

``make`` writes a checkpoint (on a machine with torch): ``python3 train.py make OUT.pt --layers 12 ...``.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any

try:
    from integration.job import jobevents
except ImportError:  # in the job's container: /job/train.py, jobevents.py beside it
    import jobevents  # type: ignore[import-not-found,no-redef]

SCRIPT_START = jobevents.now()  # before torch and the dependencies are imported


def usage() -> tuple[float, float, int]:
    """This process's CPU so far (user s, system s) and major page faults: a phase's deltas say whether its
    time went to work here (user), to the kernel for us (system: page faults, decompressing lazily read code,
    copies from a mount) or to waiting (neither)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime, ru.ru_stime, ru.ru_majflt


def spent(since: tuple[float, float, int]) -> dict[str, Any]:
    """``usage()`` deltas as event attributes."""
    now = usage()
    return {"user_s": round(now[0] - since[0], 3), "sys_s": round(now[1] - since[1], 3), "majflt": now[2] - since[2]}

# the job's dependencies (requirements.txt): imported, as a training job's data and logging code would
DEPENDENCIES = ("numpy", "six", "idna", "attrs", "packaging", "pyparsing", "dateutil", "pytz", "certifi",
                "charset_normalizer", "urllib3", "requests", "jinja2", "markupsafe", "click")


@dataclass(frozen=True)
class Config:
    vocab: int = 32000
    d_model: int = 1024
    layers: int = 12
    heads: int = 16
    ff: int = 4096
    seq: int = 64
    batch: int = 2

    def params(self) -> int:
        """Parameter count of :func:`build` (tied embeddings)."""
        per_layer = 4 * self.d_model * self.d_model + 4 * self.d_model + 2 * self.d_model * self.ff \
            + self.ff + self.d_model + 4 * self.d_model
        return self.vocab * self.d_model + self.seq * self.d_model + self.layers * per_layer + 2 * self.d_model


def build(cfg: Config) -> Any:
    import torch
    from torch import nn

    class Model(nn.Module):
        mask: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
            self.pos = nn.Embedding(cfg.seq, cfg.d_model)
            layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.heads, cfg.ff, dropout=0.0, batch_first=True,
                                               norm_first=True)
            self.blocks = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(cfg.d_model)
            self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(cfg.seq), persistent=False)

        def forward(self, x: Any) -> Any:
            pos = torch.arange(x.shape[1])
            h = self.blocks(self.tok(x) + self.pos(pos), mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True)
            return self.norm(h) @ self.tok.weight.T  # tied output head

    return Model()


def batch(cfg: Config, seed: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq + 1), generator=g)


def step(model: Any, opt: Any, data: Any) -> float:
    import torch.nn.functional as F

    logits = model(data[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), data[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def optimizer(model: Any) -> Any:
    import torch

    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)


def make(out: str, cfg: Config, seed: int) -> dict[str, Any]:
    """A checkpoint as a job would have saved it after some steps: model and AdamW state (two steps taken, so
    the moments are non-zero), and the loss the next step must print (measured here, in this process)."""
    import torch

    torch.manual_seed(seed)
    model = build(cfg)
    opt = optimizer(model)
    for k in range(2):
        step(model, opt, batch(cfg, seed + 1000 + k))
    state = {"config": asdict(cfg), "model": model.state_dict(), "optim": opt.state_dict(), "seed": seed}
    buf = io.BytesIO()
    torch.save(state, buf)
    # the expected loss: resume from exactly these bytes, as the job will
    expected = resume(io.BytesIO(buf.getvalue()))[0]
    state["expected_loss"] = expected
    tmp = out + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, out)
    return {"path": out, "bytes": os.path.getsize(out), "params": sum(p.numel() for p in model.parameters()),
            "expected_loss": expected}


def resume(src: Any) -> tuple[float, float, Any]:
    """Load ``src`` (a path or a file object), run one step: (loss, seconds of the load, the state dict)."""
    import torch

    t0, u0 = jobevents.now(), usage()
    state = torch.load(src, map_location="cpu", weights_only=True)
    cfg = Config(**state["config"])
    model = build(cfg)
    model.load_state_dict(state["model"])
    opt = optimizer(model)
    opt.load_state_dict(state["optim"])
    t1, u1 = jobevents.now(), usage()
    jobevents.emit("checkpoint_load", t0, t1, bytes=getattr(src, "nbytes", None), **spent(u0))
    torch.manual_seed(state["seed"])
    loss = step(model, opt, batch(cfg, state["seed"]))
    jobevents.emit("first_step", t1, jobevents.now(), loss=loss, **spent(u1))
    return loss, t1[1] - t0[1], state


def fetch(url: str) -> io.BytesIO:
    """The whole file, as one HTTP stream, into memory."""
    buf = io.BytesIO()
    with urllib.request.urlopen(url, timeout=60) as resp:
        while chunk := resp.read(8 << 20):
            buf.write(chunk)
    buf.seek(0)
    return buf


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["make"]:
        p = argparse.ArgumentParser(prog="train.py make", description="write a checkpoint")
        p.add_argument("out")
        p.add_argument("--seed", type=int, default=1234)
        for f, v in asdict(Config()).items():
            p.add_argument(f"--{f.replace('_', '-')}", type=int, default=v)
        a = p.parse_args(argv[1:])
        cfg = Config(**{f: getattr(a, f) for f in asdict(Config())})
        import json

        print(json.dumps(make(a.out, cfg, a.seed)))
        return 0
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="checkpoint file (local disk or a ckptfs mount)")
    src.add_argument("--ckpt-url", help="checkpoint over HTTP, read as one stream")
    a = p.parse_args(argv)
    import importlib

    for mod in ("torch", *DEPENDENCIES):
        importlib.import_module(mod)
    jobevents.emit("imports", SCRIPT_START, jobevents.now(), modules=len(DEPENDENCIES) + 1, **spent((0.0, 0.0, 0)))
    if a.ckpt_url:
        t0 = jobevents.now()
        data = fetch(a.ckpt_url)
        t1 = jobevents.now()
        jobevents.emit("checkpoint_download", t0, t1, bytes=data.getbuffer().nbytes, url=a.ckpt_url)
        loss, _, _ = resume(data)
    else:
        loss, _, _ = resume(a.ckpt)
    print(f"loss={loss:.6f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
