"""Perceptual metrics, from the libraries that maintain them (the optional extra `pip install -e ".[metrics]"`).

As the release scores (YPT inference.py): LPIPS with AlexNet from torchmetrics (inputs in [-1, 1]); DISTS,
MUSIQ and CLIPIQA+ from pyiqa. Nothing here re-implements a metric network. A metric whose package is
not installed, or whose weights cannot be fetched (offline), is skipped with one line saying which and
why; the rest of the evaluation runs.
"""
import torch

LOWER_IS_BETTER = {"lpips", "dists"}
NAMES = ("lpips", "dists", "musiq", "clipiqa+")  # full-reference first, then no-reference
NO_REFERENCE = {"musiq", "clipiqa+"}


def _lpips(device):
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    m = LearnedPerceptualImagePatchSimilarity(net_type="alex").to(device).eval()
    return lambda pred, gt: m(pred * 2 - 1, gt * 2 - 1)


def _pyiqa(name, device):
    import pyiqa

    m = pyiqa.create_metric(name, device=device).eval()
    return (lambda pred, gt: m(pred)) if name in NO_REFERENCE else (lambda pred, gt: m(pred, gt))


def load(names, device):
    """-> ({name: fn(pred, gt) -> tensor}, {name: why skipped}); pred and gt [N, 3, H, W] in [0, 1]."""
    fns, skipped = {}, {}
    for name in names:
        package = "torchmetrics" if name == "lpips" else "pyiqa"
        try:
            fns[name] = _lpips(device) if name == "lpips" else _pyiqa(name, device)
        except ImportError:
            skipped[name] = f"{package} is not installed (pip install -e \".[metrics]\")"
        except Exception as e:  # offline: the weights' download fails inside the library
            skipped[name] = f"{package} could not load it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return fns, skipped


@torch.no_grad()
def score(fns, pred, gt):
    """Mean over the N frames of each metric (no-reference ones also when gt is None)."""
    out = {}
    for name, fn in fns.items():
        if gt is None and name not in NO_REFERENCE:
            continue
        out[name] = float(torch.as_tensor(fn(pred, gt)).float().mean())
    return out
