"""Load a PyTorch state_dict of this architecture, with a precise error for anything that does not fit."""
from __future__ import annotations

from pathlib import Path

import torch

from export.model import BreakHisNet, build_model
from runtime.errors import BreakhisError


class CheckpointError(BreakhisError):
    """A checkpoint that cannot be loaded into BreakHisNet; the message names the file and every mismatch."""


def load_checkpoint(path: Path) -> BreakHisNet:
    """A state_dict saved with ``torch.save(model.state_dict())``, or a dict holding one under 'state_dict' (and
    optionally the architecture parameters under 'arch', as model directories' weights.pt do)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for corrupt or foreign files
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""  # not PyTorch's advice on weights_only
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {first[:200]})") \
            from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state_dict (a mapping of names to tensors)")
    arch = obj.get("arch", {}) if isinstance(obj, dict) else {}
    model = build_model(units=int(arch.get("units", 500)), bidirectional=bool(arch.get("bidirectional", True)),
                        width=float(arch.get("width", 1.0)))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = ([f"missing keys: {', '.join(missing)}"] if missing else []) + \
               ([f"unexpected keys: {', '.join(unexpected)}"] if unexpected else []) + \
               ([f"shape mismatches: {'; '.join(shapes)}"] if shapes else [])
    if problems:
        raise CheckpointError(f"{path}: does not match the VGG16-BiLSTM architecture:\n  " + "\n  ".join(problems))
    model.load_state_dict(state, strict=True)
    if "bn_eps" in arch:
        model.set_bn_eps(*map(float, arch["bn_eps"]))
    return model.eval()
