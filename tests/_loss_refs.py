"""Independent float64 numpy references for the losses (tests/test_losses*.py): each is the
paper's formula written plainly, never kdkit's code."""

import itertools

import numpy as np
import torch


def np64(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


def log_softmax(z: np.ndarray, axis: int = 1) -> np.ndarray:
    m = z.max(axis=axis, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=axis, keepdims=True))


def ref_kd(s, t, temperature, scale=True):
    """Hinton: T^2 * sum_c p (log p - log q), averaged over rows of (N, C)."""
    s, t = np64(s), np64(t)
    lp, lq = log_softmax(t / temperature), log_softmax(s / temperature)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=1).mean()
    return kl * temperature**2 if scale else kl


def ref_dkd(s, t, target, alpha, beta, temperature):
    s, t = np64(s) / temperature, np64(t) / temperature
    total = 0.0
    for row in range(len(s)):
        p, q = np.exp(log_softmax(t[row], 0)), np.exp(log_softmax(s[row], 0))
        g = target[row]
        b_p, b_q = np.array([p[g], 1 - p[g]]), np.array([q[g], 1 - q[g]])
        tckd = (b_p * np.log(b_p / b_q)).sum()
        others = [c for c in range(len(p)) if c != g]
        pn, qn = p[others] / p[others].sum(), q[others] / q[others].sum()
        nckd = (pn * np.log(pn / qn)).sum()
        total += alpha * tckd + beta * nckd
    return total / len(s) * temperature**2


def smooth_l1(x: np.ndarray) -> np.ndarray:
    a = np.abs(x)
    return np.where(a < 1, 0.5 * a**2, a - 0.5)


def ref_rkd(s, t, wd, wa):
    s, t = np64(s).reshape(len(s), -1), np64(t).reshape(len(t), -1)
    n = len(s)
    pairs = list(itertools.combinations(range(n), 2))

    def dist(e):
        d = np.array([np.linalg.norm(e[i] - e[j]) for i, j in pairs])
        return d / d.mean()

    def angles(e):
        out = []
        for i, j, k in itertools.permutations(range(n), 3):
            u, v = e[i] - e[j], e[k] - e[j]
            out.append(u @ v / np.linalg.norm(u) / np.linalg.norm(v))
        return np.array(out)

    return wd * smooth_l1(dist(s) - dist(t)).mean() + wa * smooth_l1(angles(s) - angles(t)).mean()


def ref_attention(f: np.ndarray, p: float) -> np.ndarray:
    a = (np.abs(f) ** p).mean(axis=1).reshape(len(f), -1)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def ref_conv3x3(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Zero-padded 3x3 convolution by shifted sums: (N, Ci, H, W) x (Co, Ci, 3, 3)."""
    n, _, h, wd = x.shape
    pad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], h, wd)) + b[None, :, None, None]
    for dy in range(3):
        for dx in range(3):
            out += np.einsum("nchw,oc->nohw", pad[:, :, dy : dy + h, dx : dx + wd], w[:, :, dy, dx])
    return out


def ref_mgd(loss, s, t, keep: np.ndarray, reduction: str) -> float:
    """Yang et al. 2022: align (1x1), mask positions, conv3x3-ReLU-conv3x3, squared error."""
    p = {k: np64(v) for k, v in loss.state_dict().items()}
    x = np64(s)
    if loss.align is not None:
        x = np.einsum("nchw,oc->nohw", x, p["align.weight"][:, :, 0, 0])
        x = x + p["align.bias"][None, :, None, None]
    x = x * keep
    hid = np.maximum(ref_conv3x3(x, p["generation.0.weight"], p["generation.0.bias"]), 0)
    gen = ref_conv3x3(hid, p["generation.2.weight"], p["generation.2.bias"])
    sq = (gen - np64(t)) ** 2
    return loss.alpha * (sq.mean() if reduction == "mean" else sq.sum() / len(x))
