"""The invertible layers of Glow, each with one contract:

    forward(x) -> (y, logdet)   logdet of shape (B,), log|det dy/dx| per sample
    reverse(y) -> x

Tensors are (B, C, H, W). Nothing here knows about distribution; ActNorm's data-dependent init takes an
optional `reduce_fn` so a distributed caller can sum the statistics over every rank before they are applied.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Reducer = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over all ranks (identity on one process)


class ActNorm(nn.Module):
    """Per-channel affine `y = (x + bias) * exp(logs)`, initialized from data to zero mean and unit variance."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        # A saved buffer, so a loaded checkpoint is never re-initialized.
        self.register_buffer("initialized", torch.tensor(False))

    @staticmethod
    def init_statistics(x: torch.Tensor) -> torch.Tensor:
        """Sums that determine the init: [count, sum_c(x), sum_c(x^2)] in float64, shape (1 + 2C,).

        Sums (not means) so that statistics from several ranks combine by plain addition.
        """
        x64 = x.detach().double()
        count = torch.tensor([x.shape[0] * x.shape[2] * x.shape[3]], dtype=torch.float64, device=x.device)
        return torch.cat([count, x64.sum(dim=(0, 2, 3)), (x64 * x64).sum(dim=(0, 2, 3))])

    @torch.no_grad()
    def initialize_from_statistics(self, stats: torch.Tensor) -> None:
        c = self.bias.shape[1]
        count, total, total_sq = stats[0], stats[1 : 1 + c], stats[1 + c :]
        mean = total / count
        var = (total_sq / count - mean * mean).clamp_min(0.0)
        self.bias.copy_((-mean).view_as(self.bias).to(self.bias.dtype))
        self.logs.copy_((-torch.log(var.sqrt() + 1e-6)).view_as(self.logs).to(self.logs.dtype))
        self.initialized.fill_(True)

    def initialize(self, x: torch.Tensor, reduce_fn: Reducer | None = None) -> None:
        """Data-dependent init from `x` (summed over ranks by `reduce_fn`); a no-op once initialized."""
        if bool(self.initialized):
            return
        stats = self.init_statistics(x)
        self.initialize_from_statistics(reduce_fn(stats) if reduce_fn is not None else stats)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = (x + self.bias) * torch.exp(self.logs)
        logdet = (x.shape[2] * x.shape[3]) * self.logs.sum()
        return y, logdet.expand(x.shape[0])

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.logs) - self.bias


def _random_rotation(n: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    return q


def inverse(weight: torch.Tensor) -> torch.Tensor:
    """W^-1 in float64. While a CUDA graph is being captured, without linalg.inv's singularity check, which reads a
    flag on the host (a capture forbids that). The LU parametrization is invertible by construction (exp(log_s) on
    the diagonal); a singular plain W, which training does not reach, would give non-finite images there."""
    if weight.is_cuda and torch.cuda.is_current_stream_capturing():
        return torch.linalg.inv_ex(weight.double()).inverse
    return torch.linalg.inv(weight.double())


class InvConv1x1(nn.Module):
    """`y = W x` at every pixel, W a full CxC matrix initialized as a random rotation."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.weight = nn.Parameter(_random_rotation(num_channels).float())

    def matrix_and_logdet(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, log|det W|), the latter per pixel, a 0-dim tensor."""
        # slogdet in float64: the fp32 LU of a large W loses digits that bits/dim would notice.
        return self.weight, torch.linalg.slogdet(self.weight.double())[1].to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.weight.shape[0]
        weight, logabsdet = self.matrix_and_logdet()
        y = F.conv2d(x, weight.view(c, c, 1, 1))
        return y, (x.shape[2] * x.shape[3] * logabsdet).expand(x.shape[0])

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        c = self.weight.shape[0]
        w_inv = inverse(self.weight).to(y.dtype)
        return F.conv2d(y, w_inv.view(c, c, 1, 1))


class InvConv1x1LU(nn.Module):
    """The 1x1 convolution parametrized as `W = P L (U + diag(sign_s * exp(log_s)))`.

    P is a fixed permutation, L unit lower-triangular, U strictly upper-triangular; the signs of s are fixed.
    logdet = H*W*sum(log_s) costs O(C) instead of an O(C^3) determinant.
    """

    def __init__(self, num_channels: int):
        super().__init__()
        p, lower, upper = torch.linalg.lu(_random_rotation(num_channels))
        s = torch.diagonal(upper)
        self.register_buffer("p", p.float())
        self.register_buffer("sign_s", torch.sign(s).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(num_channels, num_channels), -1))
        self.register_buffer("eye", torch.eye(num_channels))
        self.lower = nn.Parameter(lower.float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_s = nn.Parameter(torch.log(torch.abs(s)).float())

    def weight(self) -> torch.Tensor:
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.p @ lower @ upper

    def matrix_and_logdet(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, log|det W|), the latter per pixel, a 0-dim tensor: sum(log_s), no determinant."""
        return self.weight(), self.log_s.sum()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.log_s.shape[0]
        y = F.conv2d(x, self.weight().view(c, c, 1, 1))
        return y, (x.shape[2] * x.shape[3] * self.log_s.sum()).expand(x.shape[0])

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        c = self.log_s.shape[0]
        w_inv = inverse(self.weight()).to(y.dtype)
        return F.conv2d(y, w_inv.view(c, c, 1, 1))


class ZeroConv2d(nn.Module):
    """A 3x3 conv that starts at exactly zero output, with a learned per-channel output scale exp(3 * logs).

    The factor 3 follows the reference code: it lets the scale move faster than the weights.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * torch.exp(3.0 * self.logs)


def coupling_network(in_channels: int, out_channels: int, width: int) -> nn.Sequential:
    """conv3x3(width) - ReLU - conv1x1(width) - ReLU - zero-initialized conv3x3, so each step starts as identity."""
    first = nn.Conv2d(in_channels, width, 3, padding=1)
    middle = nn.Conv2d(width, width, 1)
    for conv in (first, middle):
        nn.init.normal_(conv.weight, 0.0, 0.05)
        nn.init.zeros_(conv.bias)
    return nn.Sequential(first, nn.ReLU(inplace=True), middle, nn.ReLU(inplace=True),
                         ZeroConv2d(width, out_channels))


class Coupling(nn.Module):
    """Affine or additive coupling: the first half `a` of the channels conditions the update of the second half `b`.

    additive: b' = b + NN(a)                                logdet = 0
    affine:   b' = (b + t) * sigmoid(s + 2), (t, s) = NN(a)  logdet = sum(log sigmoid(s + 2))
    """

    def __init__(self, num_channels: int, width: int, kind: str = "affine", bf16: bool = False):
        super().__init__()
        self.kind = kind  # additive | affine (model.coupling, checked by the config)
        self.bf16 = bf16  # the coupling network in bfloat16 (runtime.autocast)
        self.split = num_channels // 2
        out = num_channels - self.split
        self.net = coupling_network(self.split, out if kind == "additive" else 2 * out, width)

    def _nn(self, a: torch.Tensor) -> torch.Tensor:
        """NN(a) in a's dtype. With bf16 only the convolutions run in bfloat16: the update is added, and its
        logdet taken, in full precision, and forward and reverse compute the same NN(a), so the flow stays exactly
        invertible."""
        if not self.bf16:
            return self.net(a)
        # No cast cache: a CUDA graph capture must not keep casts made outside it (each region casts once anyway).
        with torch.autocast(a.device.type, dtype=torch.bfloat16, cache_enabled=False):
            return self.net(a).to(a.dtype)

    def _shift_scale(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self._nn(a)
        shift, raw_scale = h[:, 0::2], h[:, 1::2]  # interleaved, as in the reference code
        return shift, torch.sigmoid(raw_scale + 2.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, logdet = self.update(x)
        return y, x.new_zeros(x.shape[0]) if logdet is None else logdet

    def update(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`forward` with None for additive coupling's zero logdet (FlowStep skips adding it)."""
        # One split (its backward is one cat) rather than two slices (two zero-filled full-size gradients).
        a, b = x.split([self.split, x.shape[1] - self.split], dim=1)
        if self.kind == "additive":
            return torch.cat([a, b + self._nn(a)], dim=1), None
        shift, scale = self._shift_scale(a)
        logdet = torch.log(scale).flatten(1).sum(dim=1)
        return torch.cat([a, (b + shift) * scale], dim=1), logdet

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        a, b = y[:, : self.split], y[:, self.split :]
        if self.kind == "additive":
            return torch.cat([a, b - self._nn(a)], dim=1)
        shift, scale = self._shift_scale(a)
        return torch.cat([a, b / scale - shift], dim=1)


def squeeze2d(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, 4 * c, h // 2, w // 2)  # (B, 4C, H/2, W/2)


def unsqueeze2d(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    x = x.view(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // 4, 2 * h, 2 * w)  # (B, C/4, 2H, 2W)


class FlowStep(nn.Module):
    """One step of flow: ActNorm -> invertible 1x1 conv -> coupling."""

    def __init__(self, num_channels: int, width: int, coupling: str = "affine", invconv: str = "lu",
                 bf16: bool = False):
        super().__init__()
        self.actnorm = ActNorm(num_channels)
        self.invconv = InvConv1x1LU(num_channels) if invconv == "lu" else InvConv1x1(num_channels)
        self.coupling = Coupling(num_channels, width, coupling, bf16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.actnorm._forward_pre_hooks:  # data-dependent init (Glow.initialize): ActNorm must see its input
            return self.forward_layers(x)
        # ActNorm's scale folded into the 1x1 convolution: W((x + b) * s) = (W diag(s))(x + b), one full-size
        # elementwise pass fewer (and its backward). The bias stays an addition before the convolution: folding it
        # into a conv bias, W diag(s) x + W diag(s) b, would cancel two large terms when |b| >> |x + b|. Both
        # logdets are the same for every sample, H*W*(sum(log s) + log|det W|), added once.
        weight, log_abs_det = self.invconv.matrix_and_logdet()
        c = weight.shape[0]
        weight = weight * torch.exp(self.actnorm.logs).view(1, c)  # W diag(s), (C, C)
        y = F.conv2d(x + self.actnorm.bias, weight.view(c, c, 1, 1))
        logdet = (x.shape[2] * x.shape[3]) * (self.actnorm.logs.sum() + log_abs_det)
        y, ld = self.coupling.update(y)
        return y, logdet.expand(x.shape[0]) if ld is None else ld + logdet

    def forward_layers(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The composition of the three layers' `forward`, as written in the paper."""
        x, logdet = self.actnorm(x)
        x, ld = self.invconv(x)
        logdet = logdet + ld
        x, ld = self.coupling(x)
        return x, logdet + ld

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.actnorm.reverse(self.invconv.reverse(self.coupling.reverse(y)))


def gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor, logs: torch.Tensor) -> torch.Tensor:
    """Sum over all but the batch dim of log N(z; mean, exp(logs)^2): shape (B,)."""
    # -0.5 log(2 pi) - logs - 0.5 ((z - mean) / exp(logs))^2, summed; the constant added once, after the sum.
    t = (z - mean) * torch.exp(-logs)
    return (-0.5 * math.log(2 * math.pi) * z[0].numel()) - torch.addcmul(logs, t, t, value=0.5).flatten(1).sum(dim=1)
