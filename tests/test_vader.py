"""VADeR: view geometry and correspondence, the pixel InfoNCE, the encoder-decoder, the momentum
network and the queue (also across two gloo processes), and the recipes."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import ROOT, run_distributed
from shared.config import BackboneConfig, ViewConfig, build_config
from shared.errors import ConfigError
from vader.correspondence import cell_centres, correspondence, overlap_cells, sample_matches
from vader.loss import gather_pixels, pixel_info_nce
from vader.model import STRIDE, VADeR, VADeRModelConfig
from vader.train import Config
from vader.views import PairedViews

G = 56


def boxes(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def flips(*bits):
    return torch.tensor(bits, dtype=torch.bool)


# ------------------------------------------------------------------------------- correspondence
def test_identical_views_map_every_cell_to_itself_flipped_or_not():
    b = boxes([10, 20, 100, 80], [10, 20, 100, 80])
    for f in (flips(False, False), flips(True, True)):
        idx, ok = correspondence(b, f, b, f, G)
        assert ok.all()
        assert torch.equal(idx, torch.arange(G * G).expand(2, -1))


def test_a_horizontal_flip_maps_column_j_to_55_minus_j():
    b = boxes([0, 0, 224, 224])
    idx, ok = correspondence(b, flips(False), b, flips(True), G)
    assert ok.all()
    rows, cols = idx[0] // G, idx[0] % G
    j = torch.arange(G * G) % G
    assert torch.equal(rows, torch.arange(G * G) // G)
    assert torch.equal(cols, 55 - j)


def reference_match(box_a, flip_a, box_b, flip_b, grid):
    """Cell by cell, in plain Python: the centre of a's cell, through a's crop/resize/flip, into b's grid."""
    out = {}
    xa, ya, wa, ha = box_a
    xb, yb, wb, hb = box_b
    for i in range(grid):
        for j in range(grid):
            jj = grid - 1 - j if flip_a else j           # the unflipped column this cell shows
            x, y = xa + (jj + 0.5) * wa / grid, ya + (i + 0.5) * ha / grid
            u, v = (x - xb) * grid / wb, (y - yb) * grid / hb
            if 0 <= u < grid and 0 <= v < grid:
                col = int(math.floor(u))
                out[i * grid + j] = int(math.floor(v)) * grid + (grid - 1 - col if flip_b else col)
    return out


def test_a_known_crop_and_resize_maps_by_the_exact_affine_transform():
    # view a: the whole 448 px image (8 px per cell); view b: the 230 px square at (101, 101). The centre
    # of a's cell (i, j), x = 8 (j + 0.5), is at u = (x - 101) * 56 / 230 in b's grid (y likewise): the
    # affine map, evaluated exactly with fractions (no centre lands on a cell border of b at these numbers).
    from fractions import Fraction
    a, b = boxes([0, 0, 448, 448]), boxes([101, 101, 230, 230])
    idx, ok = correspondence(a, flips(False), b, flips(False), G)
    u = [(Fraction(8) * (j + Fraction(1, 2)) - 101) * 56 / 230 for j in range(G)]
    assert all(v.denominator != 1 for v in u)
    for i in range(G):
        for j in range(G):
            inside = 0 <= u[i] < G and 0 <= u[j] < G
            assert bool(ok[0, i * G + j]) == inside
            if inside:
                assert int(idx[0, i * G + j]) == math.floor(u[i]) * G + math.floor(u[j])
    assert int(ok.sum()) == sum(0 <= v < G for v in u) ** 2 > 0


def test_random_crops_and_flips_match_the_cell_by_cell_reference():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        r = torch.rand(8, generator=g, dtype=torch.float64)
        a = [r[0] * 100, r[1] * 100, 50 + r[2] * 300, 50 + r[3] * 300]
        b = [r[4] * 100, r[5] * 100, 50 + r[6] * 300, 50 + r[7] * 300]
        fa, fb = bool(torch.rand(1, generator=g) < 0.5), bool(torch.rand(1, generator=g) < 0.5)
        idx, ok = correspondence(boxes([float(v) for v in a]), flips(fa), boxes([float(v) for v in b]), flips(fb), G)
        ref = reference_match([float(v) for v in a], fa, [float(v) for v in b], fb, G)
        assert set(torch.nonzero(ok[0]).flatten().tolist()) == set(ref)     # only cells inside b are candidates
        assert all(int(idx[0, c]) == m for c, m in ref.items())


def test_cell_centres_are_the_centres_of_equal_bins():
    c = cell_centres(boxes([10, 20, 56, 112]), flips(False), G)[0]
    assert torch.allclose(c[0], torch.tensor([10.5, 21.0], dtype=torch.float64))
    assert torch.allclose(c[G * G - 1], torch.tensor([65.5, 131.0], dtype=torch.float64))
    assert overlap_cells([0, 0, 10, 10], [100, 100, 10, 10], G) == 0


def test_exactly_n_distinct_valid_cells_are_sampled_per_image():
    g = torch.Generator().manual_seed(1)
    valid = torch.rand(3, G * G, generator=g) < 0.05
    valid[:, :32] = True
    picks = sample_matches(valid, 32, g)
    assert picks.shape == (3, 32)
    for row, v in zip(picks, valid):
        assert len(set(row.tolist())) == 32 and v[row].all()
    with pytest.raises(ValueError, match="only 1 matching cells; 32 are sampled"):
        sample_matches(torch.eye(1, G * G, dtype=torch.bool), 32, g)


def view_cfg(size=224, **kw):
    base = dict(size=size, crop_scale=(0.2, 1.0), jitter_p=0.0, gray_p=0.0, blur_p=0.0, flip_p=0.5,
                order=["crop", "jitter", "gray", "blur", "flip"])
    base.update(kw)
    return ViewConfig(**base)


def coordinate_image(w=320, h=256):
    """R = x, G = y (in units of 1/255 of the width/height), B = 0: every pixel says where it is."""
    x = np.broadcast_to(np.linspace(0, 255, w), (h, w))
    y = np.broadcast_to(np.linspace(0, 255, h)[:, None], (h, w))
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], 2).round().astype(np.uint8)), w, h


def test_paired_views_pixels_at_matched_cells_show_the_same_place():
    img, w, h = coordinate_image()
    tf = PairedViews([view_cfg(), view_cfg()], STRIDE, 32)
    mean, std = torch.tensor(view_cfg().mean).view(3, 1, 1), torch.tensor(view_cfg().std).view(3, 1, 1)
    for seed in range(6):
        torch.manual_seed(seed)
        out = tf(img)
        assert out["view1"].shape == (3, 224, 224) and out["cells1"].shape == (32,) == out["cells2"].shape
        assert len(set(out["cells1"].tolist())) == 32
        cell = lambda v: F.avg_pool2d(v * std + mean, STRIDE).flatten(1) * 255   # noqa: E731  (3, 56*56)
        a = cell(out["view1"])[:2, out["cells1"]]
        b = cell(out["view2"])[:2, out["cells2"]]
        # half a cell of either view, in the coordinate image's units, plus rounding
        tol = torch.tensor([w, h]).view(2, 1) / 255.0
        half = (out["box"][:, 2:].max(0).values.view(2, 1) / G).float() / tol
        assert ((a - b).abs() <= half + 1.5).all(), (seed, (a - b).abs().max())


def test_paired_views_redraw_until_both_views_have_enough_matches():
    img, _, _ = coordinate_image()
    small = view_cfg(crop_scale=(0.05, 0.1))
    tf = PairedViews([small, small], STRIDE, 32, max_tries=3)
    for seed in range(10):
        torch.manual_seed(seed)
        out = tf(img)
        b = out["box"]
        assert overlap_cells(b[0], b[1], G) >= 32 and overlap_cells(b[1], b[0], G) >= 32


def test_the_view_geometry_is_checked():
    with pytest.raises(ConfigError, match="crop before the flip"):
        PairedViews([view_cfg(order=["flip", "crop"]), view_cfg()], STRIDE, 32)
    with pytest.raises(ConfigError, match="same size"):
        PairedViews([view_cfg(), view_cfg(size=192)], STRIDE, 32)
    with pytest.raises(ConfigError, match="multiple of 32"):
        PairedViews([view_cfg(size=48), view_cfg(size=48)], STRIDE, 32)


# ------------------------------------------------------------------------------------- the loss
def reference_pixel_info_nce(q, k, queue, t):
    rows = []
    for i in range(q.shape[0]):
        pos = torch.dot(q[i], k[i]) / t
        logits = torch.cat([pos.view(1), queue @ q[i] / t])
        rows.append(torch.logsumexp(logits, 0) - pos)
    return torch.stack(rows).mean()


@pytest.mark.parametrize("m,kq,t", [(5, 7, 0.07), (32, 64, 0.2)])
def test_pixel_info_nce_matches_the_formula_in_value_and_gradient(m, kq, t):
    g = torch.Generator().manual_seed(m)
    unit = lambda *s: F.normalize(torch.randn(*s, generator=g, dtype=torch.float64), dim=1)  # noqa: E731
    q, k, queue = unit(m, 16).requires_grad_(), unit(m, 16), unit(kq, 16)
    q2 = q.detach().clone().requires_grad_()
    ours, ref = pixel_info_nce(q, k, queue, t), reference_pixel_info_nce(q2, k, queue, t)
    ours.backward()
    ref.backward()
    assert torch.allclose(ours, ref, atol=1e-10)
    assert torch.allclose(q.grad, q2.grad, atol=1e-10)


def test_gather_pixels_takes_each_images_cells_in_row_major_order():
    fmap = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    index = torch.tensor([[0, 7], [19, 5]])
    out = gather_pixels(fmap, index)
    assert torch.equal(out[1], fmap[0, :, 1, 2]) and torch.equal(out[2], fmap[1, :, 3, 4])


# ------------------------------------------------------------------------------------ the model
def tiny(queue_len=64, batch=4, matches=4, **kw) -> VADeR:
    torch.manual_seed(0)
    cfg = VADeRModelConfig(backbone=BackboneConfig(name="resnet18"), fpn_dim=32, head_dim=32, dim=16,
                           queue_len=queue_len, matches=matches, **kw)
    return VADeR(cfg, batch)


def ctx(m=0.99):
    return SimpleNamespace(ema_momentum=m, step=0)


def test_resnet50_output_is_128_x_56_x_56_unit_vectors_and_the_decoder_has_the_counted_parameters():
    model = VADeR(VADeRModelConfig(queue_len=64 * 32), 64)
    x = torch.randn(1, 3, 224, 224)
    model.eval()
    with torch.no_grad():
        out = model.embed(model.backbone, model.decoder, x)
    assert out.shape == (1, 128, 56, 56)
    assert torch.allclose(out.norm(dim=1), torch.ones(1, 56, 56), atol=1e-5)
    # FPN: 1x1 laterals from 256/512/1024/2048 with bias, 3x3 outputs 256 -> 256 with bias;
    # head: 1 + 1 + 2 + 3 convs 3x3 (first from 256, then 128) without bias, each with GroupNorm(128);
    # predictor 1x1 128 -> 128 with bias
    lateral = sum(c * 256 + 256 for c in (256, 512, 1024, 2048))
    output = 4 * (256 * 256 * 9 + 256)
    head = 4 * 256 * 128 * 9 + 3 * 128 * 128 * 9 + 7 * 2 * 128
    predictor = 128 * 128 + 128
    assert sum(p.numel() for p in model.decoder.parameters()) == lateral + output + head + predictor
    assert sum(isinstance(m, torch.nn.Upsample) for m in model.decoder.modules()) == 0 + 1 + 2 + 3


def test_the_momentum_network_copies_encoder_and_decoder_and_keys_carry_no_gradient():
    model = tiny().eval()
    assert model.momentum_backbone.state_dict().keys() == model.backbone.state_dict().keys()
    assert model.momentum_decoder.state_dict().keys() == model.decoder.state_dict().keys()
    assert not any(p.requires_grad for p in [*model.momentum_backbone.parameters(), *model.momentum_decoder.parameters()])
    x = torch.randn(2, 3, 64, 64)
    k = model.keys(x)
    assert not k.requires_grad and k.shape == (2, 16, 16, 16)
    with torch.no_grad():                      # keys follow the momentum network, not the online one
        for p in model.decoder.parameters():
            p.add_(1.0)
    assert torch.equal(model.keys(x), k)
    with torch.no_grad():
        model.momentum_decoder.predictor.weight.mul_(-1)
    assert not torch.allclose(model.keys(x), k)


def batch_for(model, x1, x2, matches, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, grid = x1.shape[0], x1.shape[-1] // STRIDE
    cells = torch.stack([torch.randperm(grid * grid, generator=g)[:matches] for _ in range(n)])
    cells2 = torch.stack([torch.randperm(grid * grid, generator=g)[:matches] for _ in range(n)])
    return ({"view1": x1, "view2": x2, "cells1": cells, "cells2": cells2, "rcells1": cells2, "rcells2": cells}, None)


def test_forward_loss_is_pixel_info_nce_of_the_matched_cells_and_the_queue_advances_fifo():
    model = tiny(queue_len=32, batch=4, matches=4).eval()
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)
    batch = batch_for(model, x1, x2, 4)
    queue0 = model.queue.clone()
    out = model(batch, ctx(1.0))          # m = 1: the momentum network stays as it is
    views = batch[0]
    with torch.no_grad():
        q = gather_pixels(model.embed(model.backbone, model.decoder, x1), views["cells1"])
        k = gather_pixels(model.keys(x2), views["cells2"])
    assert torch.allclose(out["loss"], pixel_info_nce(q, k, queue0, model.temperature), atol=1e-5)
    assert torch.allclose(model.queue[:16], k) and torch.equal(model.queue[16:], queue0[16:])
    assert int(model.queue_ptr) == 16
    model(batch, ctx(1.0))
    assert int(model.queue_ptr) == 0 and torch.allclose(model.queue[16:], k)       # wrapped around
    assert torch.allclose(model.queue.norm(dim=1), torch.ones(32), atol=1e-5)


def test_symmetric_loss_averages_both_directions():
    model = tiny(queue_len=32, batch=4, matches=4, symmetric=True).eval()
    g = torch.Generator().manual_seed(4)
    x1, x2 = torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)
    batch = batch_for(model, x1, x2, 4)
    queue0 = model.queue.clone()
    out = model(batch, ctx(1.0))
    v = batch[0]
    with torch.no_grad():
        e1, e2 = model.embed(model.backbone, model.decoder, x1), model.embed(model.backbone, model.decoder, x2)
        k1, k2 = model.keys(x1), model.keys(x2)
        ref = 0.5 * (pixel_info_nce(gather_pixels(e1, v["cells1"]), gather_pixels(k2, v["cells2"]), queue0, 0.2)
                     + pixel_info_nce(gather_pixels(e2, v["rcells2"]), gather_pixels(k1, v["rcells1"]), queue0, 0.2))
    assert torch.allclose(out["loss"], ref, atol=1e-5)


def test_momentum_update_happens_before_the_keys():
    model = tiny().eval()
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.add_(0.1)
    before = [p.clone() for p in model.momentum_decoder.parameters()]
    online = [p.detach().clone() for p in model.decoder.parameters()]
    model(batch_for(model, torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), 4), ctx(0.9))
    for b, o, a in zip(before, online, model.momentum_decoder.parameters()):
        assert torch.allclose(a, 0.9 * b + 0.1 * o, atol=1e-6)


def test_queue_length_must_hold_whole_steps_of_pixel_keys():
    with pytest.raises(ConfigError, match="model.queue_len=100 must be a multiple of model.matches x train.batch_size"):
        tiny(queue_len=100, batch=4, matches=4)


def two_process_inputs():
    # float64: the comparison is then not at the mercy of the thread count's summation order
    model = tiny(queue_len=64, batch=8, matches=4).double().eval()
    g = torch.Generator().manual_seed(5)
    x1 = torch.randn(8, 3, 32, 32, generator=g, dtype=torch.float64)
    x2 = torch.randn(8, 3, 32, 32, generator=g, dtype=torch.float64)
    return model, x1, x2


def _two_process_step(rank, world):
    model, x1, x2 = two_process_inputs()
    (views, _) = batch_for(model, x1, x2, 4)
    part = slice(rank * 4, rank * 4 + 4)
    mine = ({k: v[part] for k, v in views.items()}, None)
    out = model(mine, ctx(0.99))
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": out["loss"].detach(), "grads": grads, "queue": model.queue.clone(), "ptr": int(model.queue_ptr)}


def test_two_processes_match_one_process_on_the_full_batch_in_loss_gradients_and_queue(tmp_path):
    ranks = run_distributed(_two_process_step, 2, tmp_path)
    model, x1, x2 = two_process_inputs()
    out = model(batch_for(model, x1, x2, 4), ctx(0.99))
    out["loss"].backward()
    # each rank's loss is the mean over its own pixels; DDP averages the ranks' gradients
    assert torch.allclose((ranks[0]["loss"] + ranks[1]["loss"]) / 2, out["loss"], atol=1e-10)
    for n, p in model.named_parameters():
        if p.grad is not None:
            avg = (ranks[0]["grads"][n] + ranks[1]["grads"][n]) / 2
            assert torch.allclose(avg, p.grad, atol=1e-9, rtol=1e-7), n
    # every rank enqueued the keys of both ranks, in rank order: the single process's full batch
    for r in ranks:
        assert r["ptr"] == int(model.queue_ptr) == 32
        assert torch.allclose(r["queue"], model.queue, atol=1e-10)


# ---------------------------------------------------------------------------------------- recipes
def recipe(name, *overrides):
    return build_config(Config, [ROOT / f"vader/configs/{name}.yaml"], overrides)


def test_recipes_load_with_their_stated_settings():
    full = recipe("vader_imagenet_200ep")
    m = full.model
    assert (m.backbone.name, m.dim, m.matches, m.queue_len, m.temperature, m.symmetric) == \
        ("resnet50", 128, 32, 65536, 0.2, False)
    assert (full.optim.lr, full.optim.lr_ref_batch, full.optim.weight_decay, full.train.batch_size,
            full.train.epochs, full.sched.ema_start) == (0.03, 256, 1e-4, 256, 200, 0.999)
    assert m.queue_len % (m.matches * full.train.batch_size) == 0
    moco = recipe("vader_from_mocov2_imagenet_100ep")
    assert moco.train.epochs == 100 and moco.model.require_init
    with pytest.raises(ConfigError, match="model.init_backbone: this recipe starts from a MoCo v2 checkpoint"):
        VADeR(VADeRModelConfig(backbone=BackboneConfig(name="resnet18"), queue_len=64, matches=4, require_init=True), 4)
    demo = recipe("demo")
    assert demo.aug.views[0].size % 32 == 0 and demo.model.queue_len % (demo.model.matches * demo.train.batch_size) == 0


def test_init_backbone_loads_a_resnet_checkpoint_into_both_networks(tmp_path):
    from torchvision.models import resnet18
    torch.manual_seed(7)
    ref = resnet18()
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in ref.state_dict().items()}}, tmp_path / "moco.pth")
    model = tiny(init_backbone=str(tmp_path / "moco.pth"))
    for k, v in ref.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(model.backbone.state_dict()[k], v) and torch.equal(model.momentum_backbone.state_dict()[k], v)
