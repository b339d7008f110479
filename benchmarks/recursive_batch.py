"""Diagnosis: how far a batch's update determines every image of it, layer by layer (issue 25).

On a trained ConvNet (eval-mode BatchNorm) the images the network is sure of hold ~0.3 % of a
batch's update, and gradient matching does not recover them (docs/models.md). This script asks
whether the update still determines them, with R-GAP's recursion (Zhu & Blaschko 2021) run on a
whole batch from the output separation's per-image factors:

1. ``separate_output_gradients`` gives each image's output gradient ``u_i`` and classifier
   features ``h_i`` (attacker-known, no ground truth).
2. Each convolution's weight gradient is linear in its input once every image's output delta is
   known: ``dW[:, c] = M(D) a[:, c]`` with the same matrix ``M`` (rows: output channel x kernel
   offset; columns: image x position) for every input channel ``c``. Least squares gives every
   image's input activation at once (the deltas set the columns' scale, so an image holding 0.3 %
   of the update is solved as exactly as the others, up to the update's float32 rounding).
3. The deltas of the layer below need each ReLU's mask: read from the activation just solved
   (entries above 1e-3 of the image's largest), then the entries nearest that threshold flipped while
   the next layer's least-squares residual falls (right masks fit to ~1e-5, one wrong entry to ~1e-4
   .. 1e-2).
4. A max-pooling needs its switches (which of the 9 positions won each window): ``--switches
   oracle`` takes them from the truth (what the recursion could do if they were found);
   ``--switches start`` takes them from a start image at a given noise (what an attack's
   reconstruction would give) and alternates: solve, then each window's argmax of the solved
   activation (which makes them worse: docs/models.md). ``--switches oracle --wrong K`` moves K of
   the true switches (what one wrong switch costs).
5. ``--switches alternate`` alternates the two exact steps, the switches from conv6's inputs (one
   linear solve per output channel, :func:`switches_from_inputs`) and the inputs from the switches,
   from a noisy start's inputs, for every image or (``--only-dominant``) the largest one alone.

It reports each stage's relative error per image against the truth (diagnosis only), then
inverts each image from its recovered first-pooling output (signed Adam, TV) and prints PSNR.

    python benchmarks/trained_grid.py train --data digits       # the networks, once
    python benchmarks/recursive_batch.py --net adam --images 8,9,10,11 --switches oracle
    python benchmarks/recursive_batch.py --net adam --images 8,9,10,11 --switches start --noise 0.1
    python benchmarks/recursive_batch.py --net adam --images 8,9,10,11 --switches oracle --wrong 1
    python benchmarks/recursive_batch.py --net adam --images 8,9,10,11 --switches alternate --only-dominant
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch
from torch.nn.functional import conv2d, conv_transpose2d, max_pool2d, max_unpool2d, unfold

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trained_grid as tg  # noqa: E402

import gradleak as gl  # noqa: E402
from gradleak.attacks import separate_output_gradients  # noqa: E402
from gradleak.attacks.matching import total_variation  # noqa: E402
from gradleak.metrics import psnr  # noqa: E402

MASK_LEVEL = 1e-3      # a ReLU output counts as active above this fraction of its image's largest
FEATURES_ZERO = 1e-5   # the separated features' zeros sit at ~1e-7 of their largest (1e-3 would drop true small ones)
ACCEPT = 0.999         # a flip is kept when the residual falls by this factor
UNCERTAIN = 1e-2       # mask entries within this fraction of their image's largest are tried by flipping,
FLIP_CANDIDATES = 1000 # at most this many, the least certain first


def conv_input_from_weight_grad(weight_grad: torch.Tensor, deltas: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Every image's input ``(B, C, H, H)`` of a 3x3, padding-1 convolution from its batch weight
    gradient ``(O, C, 3, 3)`` and each image's output delta ``(B, O, H, H)``; and the relative
    least-squares residual (the check that the deltas are right). Determined where the ``9 O``
    equations per input channel are at least the ``B H H`` unknowns and the deltas reach every position."""
    B, O, H, _ = deltas.shape
    # row (o, k): each image's delta shifted by the kernel offset k, i.e. its 3x3 patches in flipped order
    M = unfold(deltas, 3, padding=1).view(B, O, 9, H * H).flip(2).permute(1, 2, 0, 3).reshape(O * 9, B * H * H)
    C = weight_grad.shape[1]
    rhs = weight_grad.permute(0, 2, 3, 1).reshape(O * 9, C)
    solution = torch.linalg.lstsq(M, rhs, driver="gelsd").solution
    residual = float((M @ solution - rhs).norm() / rhs.norm())
    return solution.T.reshape(C, B, H, H).permute(1, 0, 2, 3), residual


class Net:
    """The ConvNet's layers as the recursion reads them (float64, eval-mode BatchNorm as affine maps)."""

    def __init__(self, module, gradient):
        self.f, self.g = module.features, gradient

    def weight(self, i):
        return self.f[i].weight.detach().double()

    def bn_scale(self, i):
        bn = self.f[i]
        return (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double()[None, :, None, None]

    def pre_activation(self, conv, a):
        """BatchNorm(conv(a)) of layer ``conv`` (its BatchNorm is the next module)."""
        bn = self.f[conv + 1]
        z = conv2d(a, self.weight(conv), self.f[conv].bias.detach().double(), padding=1)
        return (z - bn.running_mean.double()[None, :, None, None]) * self.bn_scale(conv + 1) + \
            bn.bias.detach().double()[None, :, None, None]

    def solve(self, conv, deltas):
        return conv_input_from_weight_grad(self.g[f"features.{conv}.weight"], deltas)


def refine_mask(mask, certainty, solve):
    """Flip the least certain entries of a boolean ``mask`` (smallest ``certainty``) while the
    least-squares residual of ``solve(mask) -> (solution, residual)`` falls (below ACCEPT times it)."""
    best, residual = solve(mask)
    flat = certainty.abs().flatten()
    uncertain = [j for j in flat.argsort()[:FLIP_CANDIDATES].tolist() if flat[j] < UNCERTAIN]
    improved = True
    while improved:
        improved = False
        for j in uncertain:
            trial = mask.clone().flatten()
            trial[j] = ~trial[j]
            trial = trial.view_as(mask)
            solution, r = solve(trial)
            if r < ACCEPT * residual:
                mask, best, residual, improved = trial, solution, r, True
    return mask, best, residual


def relative_level(a):
    return a.flatten(1).abs().max(1).values[:, None, None, None]


def masked_solve(net, conv_above, conv, delta_above, activation):
    """The input of ``conv`` from the deltas above it, with the ReLU mask of ``activation`` (the
    input of ``conv_above``) read off and refined by the residual. Returns (input, deltas, residual)."""
    back = conv_transpose2d(delta_above, net.weight(conv_above), padding=1) * net.bn_scale(conv + 1)
    level = relative_level(activation)
    mask = activation > MASK_LEVEL * level
    margin = (activation - MASK_LEVEL * level) / level                  # nearest the threshold: least certain
    mask, a, residual = refine_mask(mask, margin, lambda m: net.solve(conv, back * m))
    return a, back * mask, residual


def invert_from(module, spec, layer, target, shape, iterations=800, tv=1e-2):
    """Images whose activation at ``layer`` matches ``target`` (cosine per image; signed Adam, TV)."""
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    lo, hi = spec.normalize(torch.zeros(shape[1:])[None]), spec.normalize(torch.ones(shape[1:])[None])
    opt = torch.optim.Adam([z], lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [iterations * 3 // 8, iterations * 5 // 8, iterations * 7 // 8], 0.1)
    for _ in range(iterations):
        opt.zero_grad()
        h = module.features[:layer + 1](z)
        loss = (1 - torch.nn.functional.cosine_similarity(h.flatten(1), target.float().flatten(1), dim=1)).sum()
        loss = loss + tv * sum(total_variation(z[i:i + 1]) for i in range(len(z)))
        loss.backward()
        z.grad.sign_()
        opt.step()
        sched.step()
        with torch.no_grad():
            z.copy_(torch.max(torch.min(z, hi), lo))
    return spec.denormalize(z.detach()).clamp(0, 1)


def client_batch(net_name, idx):
    """The grid's ConvNet-16 digit network ``net_name`` (eval mode), the batch of data set indices
    ``idx``, its client's float32 update (as float64) and, for the report only, every layer's truth."""
    grid = types.SimpleNamespace(data="digits", n_data=None, size=32, model="convnet", options='{"width": 16}',
                                 seed=0, epochs=None, test_fraction=0.2)
    module, record = tg.network(grid, net_name)
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    spec = gl.DataSpec(tuple(record["data_spec"]["mean"]), tuple(record["data_spec"]["std"]))
    x, y = tg._images(grid, record, "chosen", idx)
    update = gl.fedsgd_update(module, x, y, spec=spec)
    gradient = {k: v.double() for k, v in update.tensors.items()}
    with torch.no_grad():
        truth, h = {}, spec.normalize(x)
        for k, m in enumerate(module.features):
            h = m(h)
            truth[k] = h.double()
    return module, spec, x, y, gradient, truth


def separated_top(module, gradient, B, truth):
    """The separation's per-image classifier features and labels, rows put in the true images' order
    (a permutation, for the report), and each image's output gradient recomputed from its features in
    float64: the fit's own output gradients carry the float32 client's rounding of ``p_y`` (~1e-4
    relative here), the features only ~1e-7."""
    sep = separate_output_gradients(gradient["fc.weight"], gradient["fc.bias"], module.fc.weight, module.fc.bias,
                                    batch=B)
    order = [int(torch.nn.functional.cosine_similarity(sep.features, truth[25].flatten(1)[i:i + 1]).argmax())
             for i in range(B)]
    feats, found = sep.features[order], sep.labels[order]
    logits = feats @ module.fc.weight.double().T + module.fc.bias.double()
    u = (logits.softmax(1) - torch.nn.functional.one_hot(found, logits.shape[1]).double()) / B
    return sep, order, u, feats.view(B, *truth[25].shape[1:]), found


def noisy_start(x, noise):
    """The batch plus Gaussian pixel noise ``noise`` (seeded), clamped: a stand-in for an attack's reconstruction."""
    return (x + noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)


def start_switches(module, spec, x, noise):
    """The second max-pool's switches of the batch plus pixel noise ``noise`` (a stand-in for an
    attack's reconstruction), and the start's PSNR per image."""
    start = noisy_start(x, noise)
    with torch.no_grad():
        h = module.features[:18](spec.normalize(start))                # the second max-pool's input
    _, switch = max_pool2d(h.double(), 3, return_indices=True)
    return switch, [round(float(psnr(start[i:i + 1], x[i:i + 1])), 1) for i in range(len(x))]


def window_positions(size=10, k=3):
    """``(windows, k*k)``: the flat positions of a ``size x size`` map that each of a stride-``k``
    max-pool's windows covers (row-major windows; the last row and column fall outside any)."""
    n = size // k
    return torch.tensor([[(k * wy + dy) * size + k * wx + dx for dy in range(k) for dx in range(k)]
                         for wy in range(n) for wx in range(n)])


def unit_responses(a):
    """``(B, H*H, C, 9)``: the block of a 3x3, padding-1 convolution's weight gradient (input channel x
    kernel offset) that a unit output delta at each position of each image adds, given its input ``a``."""
    B, C, H, _ = a.shape
    return unfold(a, 3, padding=1).view(B, C, 9, H * H).permute(0, 3, 1, 2)


def switches_from_inputs(weight_grad, a, values):
    """A stride-3 max-pool's switches from the convolution below it, its input ``a`` ``(B, C, H, H)``
    known: with each window's delta ``values`` ``(B, O, n, n)`` known, the weight gradient of output
    channel ``o`` is linear in the 9 relaxed weights of each window's positions (``9 C`` equations for
    ``9 B n n`` unknowns: 576 for 324 at conv6). One least-squares solve per output channel; on exact
    inputs the solution is one-hot at the true switch (no start needed). Returns the switches (each
    window's largest weight) and the relative residual."""
    O, C = weight_grad.shape[:2]
    B, n = len(a), values.shape[-1]
    positions = window_positions(a.shape[-1])
    blocks = unit_responses(a)[:, positions.flatten()].reshape(B, n * n, 9, C * 9)
    design = (values.flatten(2)[..., None, None] * blocks[:, None]).permute(1, 4, 0, 2, 3).reshape(O, C * 9, -1)
    target = weight_grad.reshape(O, C * 9, 1)
    weights = torch.linalg.lstsq(design, target, driver="gelsd").solution
    residual = float((design @ weights - target).norm() / target.norm())
    weights = weights.view(O, B, n * n, 9).permute(1, 0, 2, 3)
    return positions[torch.arange(n * n), weights.argmax(-1)].view(B, O, n, n), residual


def perturbed_switches(switch, active, k, size=10, seed=3):
    """The switches ``switch`` of a ``size x size`` map with ``k`` of the ``active`` windows moved to
    another position of their window."""
    generator, switch, windows = torch.Generator().manual_seed(seed), switch.clone(), window_positions(size)
    for i, o, wy, wx in active.nonzero()[torch.randperm(int(active.sum()), generator=generator)[:k]].tolist():
        window = windows[wy * switch.shape[-1] + wx]
        others = window[window != switch[i, o, wy, wx]]
        switch[i, o, wy, wx] = others[int(torch.randint(len(others), (1,), generator=generator))]
    return switch


def alternate(net, back19, active, a15, true_switch, truth15, images, passes):
    """``--switches alternate`` (a diagnosis): from conv6 inputs ``a15`` (a start's), alternate
    :func:`switches_from_inputs` with the least-squares inputs those switches give, for ``images``
    only (the others' part of the weight gradient then stays in it as noise). Prints per pass the
    wrong switches of those images, both residuals and their inputs' errors."""
    scale = net.bn_scale(17)
    values, g = (back19 * active * scale)[images], net.g["features.16.weight"]
    for step in range(passes):
        switch, r_switch = switches_from_inputs(g, a15, values)
        deltas = max_unpool2d(back19[images] * active[images], switch, 3, output_size=(10, 10)) * scale
        a15, r_inputs = net.solve(16, deltas)
        wrong = ((switch != true_switch[images]) & active[images]).flatten(1).sum(1).tolist()
        errors = [float((a15[j] - truth15[i]).norm() / truth15[i].norm()) for j, i in enumerate(images)]
        print(f"pass {step}: wrong {wrong} of {active[images].flatten(1).sum(1).tolist()}, residuals {r_switch:.3g} "
              f"(switches) {r_inputs:.3g} (inputs), a15 errors {' '.join(f'{e:.2g}' for e in errors)}", flush=True)
    return {"wrong_switches": wrong, "conv6_residual": r_inputs, "a15": errors}


def layer_shares(module, spec, x, y):
    """Each image's share of each weight gradient's norm (the sum of the per-image norms), from the truth."""
    alone = [gl.fedsgd_update(module, x[i:i + 1], y[i:i + 1], spec=spec).tensors for i in range(len(x))]
    shares = {}
    for key in alone[0]:
        if key.endswith("weight"):
            norms = torch.stack([t[key].norm() for t in alone])
            shares[key] = [round(float(n), 3) for n in norms / norms.sum()]
    return shares


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--net", default="adam")
    parser.add_argument("--images", default="8,9,10,11", help="data set indices of one batch")
    parser.add_argument("--switches", choices=["oracle", "start", "alternate"], default="oracle")
    parser.add_argument("--noise", type=float, default=0.1, help="--switches start|alternate: the start's pixel noise")
    parser.add_argument("--wrong", type=int, default=0, help="--switches oracle: this many of them moved")
    parser.add_argument("--only-dominant", action="store_true", help="--switches alternate: the image with the "
                        "largest separated share alone")
    parser.add_argument("--passes", type=int, default=4, help="--switches start|alternate: alternating passes")
    parser.add_argument("--layer-shares", action="store_true", help="print each image's share of every "
                        "layer's weight-gradient norm and stop")
    parser.add_argument("--iterations", type=int, default=800, help="inversion from the first pooling's output")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    idx = [int(i) for i in args.images.split(",")]
    module, spec, x, y, gradient, truth = client_batch(args.net, idx)
    if args.layer_shares:
        return _report(layer_shares(module, spec, x, y), args.json)
    net, B = Net(module, gradient), len(idx)
    sep, order, u, feats, found = separated_top(module, gradient, B, truth)
    result = {"net": args.net, "images": idx, "labels_found": found.tolist(), "labels": y.tolist(),
              "separation_residual": sep.residual, "shares": [round(float(s), 5) for s in sep.shares()[order]]}

    def error(est, k):
        return [float((est[i] - truth[k][i]).norm() / truth[k][i].norm()) for i in range(B)]

    on = feats > FEATURES_ZERO * feats.flatten(1).abs().max(1).values[:, None, None, None]
    d23 = (u @ module.fc.weight.double()).view(B, 64, 3, 3) * on * net.bn_scale(24)
    a22, r = net.solve(23, d23)
    a19, d20, r20 = masked_solve(net, 23, 20, d23, a22)
    result["a22"], result["a19 (pool 2 out)"] = error(a22, 22), error(a19, 19)
    result["residuals"] = {"conv8": r, "conv7": r20}
    back19 = conv_transpose2d(d20, net.weight(20), padding=1)
    active = a19 > MASK_LEVEL * relative_level(a19)                      # the windows with a positive max
    _, true_switch = max_pool2d(truth[18], 3, return_indices=True)
    if args.switches == "alternate":                                     # the truth's active windows: switches only
        active, images = truth[19] > 0, list(range(B))
        if args.only_dominant:
            images = [int(sep.shares()[order].argmax())]
        with torch.no_grad():
            a15 = module.features[:16](spec.normalize(noisy_start(x, args.noise))).double()[images]
        result.update(alternate(net, back19, active, a15, true_switch, truth[15], images, args.passes))
        return _report(result, args.json)
    if args.switches == "oracle":
        switch = perturbed_switches(true_switch, truth[19] > 0, args.wrong)
    else:
        switch, result["start_psnr"] = start_switches(module, spec, x, args.noise)
    for step in range(1 if args.switches == "oracle" else args.passes):
        def solve16(mask):
            return net.solve(16, max_unpool2d(back19 * mask, switch, 3, output_size=(10, 10)) * net.bn_scale(17))

        active, a15, r16 = refine_mask(active, a19 / relative_level(a19), solve16)
        d16 = max_unpool2d(back19 * active, switch, 3, output_size=(10, 10)) * net.bn_scale(17)
        wrong = int(((switch != true_switch) & active).sum())
        print(f"switches pass {step}: {wrong} of {int(active.sum())} wrong, conv6 residual {r16:.1e}", flush=True)
        _, switch = max_pool2d(net.pre_activation(16, a15), 3, return_indices=True)
    a12, d13, r13 = masked_solve(net, 16, 13, d16, a15)
    result["wrong_switches"], result["pool2_active_errors"] = wrong, int((active != (truth[19] > 0)).sum())
    result["residuals"].update({"conv6": r16, "conv5": r13})
    result["a15"], result["a12 (pool 1 out)"] = error(a15, 15), error(a12, 12)
    rec = invert_from(module, spec, 12, a12, tuple(x.shape), args.iterations)
    result["psnr_from_a12"] = [round(float(psnr(rec[i:i + 1], x[i:i + 1])), 1) for i in range(B)]
    return _report(result, args.json)


def _report(result, path):
    for key, value in result.items():
        floats = isinstance(value, list) and value and isinstance(value[0], float)
        print(f"{key}: {' '.join(f'{v:.3g}' for v in value) if floats else value}")
    if path:
        path.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
