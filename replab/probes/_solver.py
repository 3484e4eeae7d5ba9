"""Batched multinomial L2 logistic regression in torch (the probe engine).

Many problems that share one design matrix (one layer's activations) are fitted at
once: problem ``p`` has its own training rows (a mask), its own labels and its own
L2 strength. One ``[n, d] @ [d, P*K]`` matmul evaluates every problem, so a whole
nested-CV grid costs a few dozen large matmuls instead of hundreds of sklearn refits.

Objective of problem ``p`` (identical to scikit-learn's ``LogisticRegression`` with
``C = 1 / (lam * n_p)``, multinomial, unpenalised intercept)::

    mean_{i in train_p} CE(z_i @ W_p + b_p, y_pi) + lam_p / 2 * ||W_p||^2

Optimiser: accelerated (FISTA) gradient descent with the diagonal preconditioner
``1 / (0.5 * eig_j + lam)`` in the eigenbasis of ``Z^T Z / n`` (Böhning's bound on the
softmax Hessian), adaptive momentum restart, and a per-problem step back-off when the
loss rises. Callers rotate ``Z`` into that eigenbasis (:func:`eigenbasis`); the L2
penalty is rotation-invariant, so solutions rotate back exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Basis:
    """Centre, scale and rotation that make the Gram matrix diagonal.

    ``z = (x - mean) / scale @ rot``; ``eig`` are the eigenvalues of ``z^T z / n``.
    """

    mean: torch.Tensor   # [d]
    scale: float
    rot: torch.Tensor    # [d, d]
    eig: torch.Tensor    # [d]

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, d]`` raw activations -> ``[n, d]`` rotated coordinates."""
        return ((x - self.mean) / self.scale) @ self.rot


def eigenbasis(x: torch.Tensor) -> Basis:
    """Label-free basis from ``x [n, d]`` (float32): centre, one RMS scale, eigenvectors."""
    x = x.float()
    mean = x.mean(0)
    xc = x - mean
    scale = float(xc.pow(2).mean().sqrt()) or 1.0
    xc = xc / scale
    gram = (xc.T @ xc) / x.shape[0]
    eig, rot = torch.linalg.eigh(gram.double())
    return Basis(mean, scale, rot.float(), eig.clamp_min(0).float())


def fit_logistic(z: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, lam: torch.Tensor,
                 n_classes: int, eig: torch.Tensor, init=None, max_iter: int = 200,
                 tol: float = 1e-5, step0: float = 1.0):
    """Fit ``P`` multinomial logistic problems sharing ``z``.

    Args:
        z: ``[n, d]`` design (rotated coordinates, see :func:`eigenbasis`).
        y: ``[P, n]`` int labels in ``0..K-1`` (anything for rows outside the mask).
        mask: ``[P, n]`` bool, the training rows of each problem.
        lam: ``[P]`` L2 strengths (per-sample scale).
        n_classes: ``K``.
        eig: ``[d]`` eigenvalues of ``z^T z / n`` (the preconditioner).
        init: optional ``(W [P, d, K], b [P, K])`` warm start.
        max_iter: iteration cap; ``tol``: stop when every problem's relative loss
            change over 10 iterations is below it.

    Returns:
        ``(W [P, d, K], b [P, K], n_iter)``.
    """
    n, d = z.shape
    P, K = y.shape[0], n_classes
    z = z.float()
    maskf = mask.float().T                                   # [n, P]
    n_p = mask.sum(1).clamp_min(1).float()                   # [P]
    onehot = torch.zeros(n, P, K)
    onehot.scatter_(2, y.T.clamp(0, K - 1).long().unsqueeze(-1), 1.0)
    onehot *= maskf.unsqueeze(-1)
    lam = lam.float()
    if init is None:
        w = torch.zeros(P, d, K)
        b = torch.zeros(P, K)
    else:
        w, b = init[0].clone().float(), init[1].clone().float()
    pre_w = 1.0 / (0.5 * eig.view(1, d, 1) + lam.view(P, 1, 1))   # [P, d, 1]
    pre_b = 2.0
    maskf_k = maskf.unsqueeze(-1)
    step = torch.full((P,), float(step0))

    def loss_grad(w, b, need_loss=False, need_grad=True):
        logits = (z @ w.permute(1, 0, 2).reshape(d, P * K)).view(n, P, K)
        logits += b
        logits -= logits.amax(-1, keepdim=True)
        logits.clamp_(min=-80.0)          # exp() stays a normal float: denormals are 100x slower
        prob = logits.exp()
        norm = prob.sum(-1, keepdim=True)
        prob /= norm
        loss = None
        if need_loss:
            ce = -(onehot * (logits - norm.log())).sum((0, 2)) / n_p
            loss = ce + 0.5 * lam * w.pow(2).sum((1, 2))
        if not need_grad:
            return loss, None, None
        prob *= maskf_k
        prob -= onehot
        prob /= n_p.view(1, P, 1)                                            # residual [n, P, K]
        gw = (z.T @ prob.view(n, P * K)).view(d, P, K).permute(1, 0, 2) + lam.view(P, 1, 1) * w
        gb = prob.sum(0)
        return loss, gw, gb

    x_w, x_b = w, b
    t = torch.ones(P)
    loss_prev, _, _ = loss_grad(w, b, need_loss=True, need_grad=False)
    ref = loss_prev.clone()
    it = 0
    for it in range(1, max_iter + 1):
        _, gw, gb = loss_grad(w, b)
        s = step.view(P, 1, 1)
        new_w = w - s * pre_w * gw
        new_b = b - step.view(P, 1) * pre_b * gb
        loss_new = loss_grad(new_w, new_b, True, False)[0] if it % 10 == 0 else None
        # adaptive restart (gradient scheme): momentum pointing uphill -> reset
        uphill = ((gw * (new_w - x_w)).sum((1, 2)) + (gb * (new_b - x_b)).sum(1)) > 0
        t_new = (1 + torch.sqrt(1 + 4 * t * t)) / 2
        beta = ((t - 1) / t_new).masked_fill(uphill, 0.0)
        t = torch.where(uphill, torch.ones_like(t), t_new)
        w = new_w + beta.view(P, 1, 1) * (new_w - x_w)
        b = new_b + beta.view(P, 1) * (new_b - x_b)
        x_w, x_b = new_w, new_b
        if loss_new is not None:
            worse = loss_new > loss_prev * (1 + 1e-6)
            step = torch.where(worse, step * 0.5, step)
            t = torch.where(worse, torch.ones_like(t), t)
            if worse.any():
                w, b = x_w, x_b
            rel = (loss_prev - loss_new).abs() / ref.clamp_min(1e-12)
            loss_prev = torch.minimum(loss_prev, loss_new)
            if bool((rel < tol).all()) and not worse.any():
                break
    return x_w, x_b, it
