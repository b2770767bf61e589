"""PSNR and SSIM on torch tensors, matching scikit-image (paper.md section 7).

The paper scores with scikit-image: `peak_signal_noise_ratio(gt, pred, data_range=1)` and
`structural_similarity(gt, pred, channel_axis=2, data_range=1)`, i.e. SSIM with skimage's
*defaults*: a uniform 7x7 window and the sample covariance (N / (N - 1)). That is `ssim(x, y)` here.
`ssim(x, y, gaussian=True)` is the setting of Wang et al. 2004 that most restoration papers quote:
an 11x11 Gaussian window (sigma 1.5, truncated at 3.5 sigma) and the population covariance, equal to
skimage's `gaussian_weights=True, sigma=1.5, use_sample_covariance=False`.

Both take images in [0, 1] as [B, C, H, W] (or [C, H, W]) and return one value per image, [B], in
fp64 (on the images' device). `to_y` gives the luma channel many restoration papers score instead of RGB.
"""
import torch
import torch.nn.functional as F

K1, K2 = 0.01, 0.03  # Wang et al. 2004, as skimage


def _batched(x, y):
    if x.shape != y.shape:
        raise ValueError(f"the images differ in shape: {tuple(x.shape)} and {tuple(y.shape)}")
    if x.ndim == 3:
        x, y = x[None], y[None]
    if x.ndim != 4:
        raise ValueError(f"expected images as [B, C, H, W] or [C, H, W], got shape {tuple(x.shape)}")
    # fp64: the variances below are differences of nearly equal means (uxx - ux^2), which fp32 rounds
    # visibly on smooth images; skimage works in fp64 for fp64 input.
    return x.double(), y.double()


def psnr(x, y, data_range=1.0):
    """10 log10(data_range^2 / MSE), the MSE over all channels and pixels of each image. Equal -> inf."""
    x, y = _batched(x, y)
    mse = (x - y).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(data_range**2 / mse)


def _window(gaussian, sigma=1.5, truncate=3.5, size=7):
    """The normalised 2D filter skimage uses: scipy's gaussian_filter kernel, or uniform_filter's box."""
    if gaussian:
        radius = int(truncate * sigma + 0.5)  # as scipy.ndimage: 5 for sigma 1.5, an 11x11 window
        t = torch.arange(-radius, radius + 1, dtype=torch.float64)
        w = torch.exp(-0.5 * (t / sigma) ** 2)
    else:
        w = torch.ones(size, dtype=torch.float64)
    w = w / w.sum()
    return torch.outer(w, w)  # separable: [win, win]


def ssim(x, y, data_range=1.0, gaussian=False):
    """Mean structural similarity per image, averaged over channels, as skimage computes it.

    gaussian=False: skimage defaults (the paper): uniform 7x7 window, sample covariance.
    gaussian=True: Wang et al.: 11x11 Gaussian window (sigma 1.5), population covariance.
    """
    x, y = _batched(x, y)
    B, C, H, W = x.shape
    w = _window(gaussian).to(x.device)
    win = w.shape[0]
    if H < win or W < win:
        raise ValueError(f"SSIM needs images of at least {win}x{win} pixels, got {H}x{W}")
    n = win * win
    cov_norm = 1.0 if gaussian else n / (n - 1)

    # skimage filters with reflected borders, then drops a (win - 1) // 2 strip on every side before
    # averaging: exactly the windows that lie inside the image, i.e. a conv without padding.
    def filt(t):  # [B, C, H, W] -> [B, C, H - win + 1, W - win + 1], each channel on its own
        return F.conv2d(t.reshape(B * C, 1, H, W), w[None, None]).view(B, C, H - win + 1, W - win + 1)

    ux, uy = filt(x), filt(y)
    vx = cov_norm * (filt(x * x) - ux * ux)
    vy = cov_norm * (filt(y * y) - uy * uy)
    vxy = cov_norm * (filt(x * y) - ux * uy)
    C1, C2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    # SSIM = (2 ux uy + C1)(2 vxy + C2) / ((ux^2 + uy^2 + C1)(vx + vy + C2))
    s = (2 * ux * uy + C1) * (2 * vxy + C2) / ((ux * ux + uy * uy + C1) * (vx + vy + C2))
    return s.mean(dim=(1, 2, 3))  # every channel has the same number of windows: mean of channel means


def to_unit(x):
    """[-1, 1] (the autoencoder's range) -> [0, 1], clamped, for the metrics above."""
    return ((x + 1) / 2).clamp(0, 1)



def to_y(x):
    """RGB [B, 3, H, W] in [0, 1] -> BT.601 luma [B, 1, H, W] in [16/255, 235/255], as skimage's rgb2ycbcr
    (and MATLAB's rgb2ycbcr, which most restoration papers' Y-channel PSNR/SSIM use) divided by 255:
    Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255."""
    w = torch.tensor([65.481, 128.553, 24.966], dtype=torch.float64, device=x.device)
    return ((16 + torch.einsum("bchw,c->bhw", x.double(), w)) / 255)[:, None]
