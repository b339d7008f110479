"""The reference side of benchmarks/reference_side_by_side.py: runs in the breaching
library's own virtual environment (breaching==0.1.2, CPU torch), never imports gradleak.

    /tmp/breaching-venv/bin/python benchmarks/_breaching_worker.py INPUT.pt OUTPUT.pt

INPUT.pt (written by the driver): the ConvNet state dict (breaching's layout), the images in
[0, 1] (N, 3, 32, 32), their labels, the time cap in seconds, how often to record, threads.
Breaching runs its Inverting Gradients with its own default configuration
(``case=1_single_image_small``, ``attack=invertinggradients``); its CIFAR-10 download is
replaced by a loader of these images (one block, normalized with the case's CIFAR-10 mean
and std). Recorded, without changing the attack: at every iteration the
candidate the library keeps as its best (same rule as its loop: the candidate after the step
whose objective is the lowest so far); every ``record_every`` iterations its PSNR against
the images and the wall seconds so far (the recording's own cost subtracted). The time cap
ends the trial the way Ctrl-C does in the library (it keeps its best candidate).
OUTPUT.pt: the curve, the final images, the shared gradient (for the driver's check that
both tools attack the same update), iterations and seconds.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict

import torch


class _Recorder(defaultdict):
    """The attack's ``stats`` dict; its trial list's ``append(value)`` is called once per
    iteration right after the library has updated its best candidate."""

    def __init__(self, truth, mean, std, cap, every):
        super().__init__(list)
        self.truth, self.mean, self.std, self.cap, self.every = truth, mean, std, cap, every
        self.candidate = None      # set by the optimizer hook
        self.best_value, self.best = float("inf"), None
        self.curve, self.iteration, self.overhead = [], 0, 0.0
        self.start = None

    def __missing__(self, key):
        if key.startswith("Trial_") and key.endswith("_Val"):
            recorder = self

            class _Values(list):
                def append(self, value):
                    super().append(value)
                    recorder.seen(value)

            self[key] = _Values()
            return self[key]
        return super().__missing__(key)

    def seen(self, value: float) -> None:
        entered = time.perf_counter()
        if value < self.best_value:
            self.best_value, self.best = value, self.candidate.detach().clone()
        self.iteration += 1
        if self.iteration % self.every == 0 or self.iteration == 1:
            images = (self.best * self.std + self.mean).clamp(0, 1)
            mse = ((images - self.truth) ** 2).flatten(1).mean(1)
            psnr = float((10 * torch.log10(1 / mse)).mean())
            self.curve.append({"iteration": self.iteration, "seconds": entered - self.start - self.overhead,
                               "psnr": psnr, "loss": value})
        self.overhead += time.perf_counter() - entered
        if time.perf_counter() - self.start - self.overhead >= self.cap:
            raise KeyboardInterrupt  # the library's own "stop here, keep the best candidate"


def _torchvision_importable() -> None:
    """The registry's torchvision 0.28.0 is a CUDA build whose compiled ops fail to load next to
    the CPU torch (DESIGN.md, "Machine facts"): declare the two operator schemas its import
    registers fake kernels for, only when loading its own library fails."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        return
    try:
        for location in spec.submodule_search_locations:
            for candidate in Path(location).glob("_C*.so"):
                torch.ops.load_library(str(candidate))
                return
    except (OSError, RuntimeError):
        pass
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _KEEP.append(library)


_KEEP: list = []


def main(source: str, target: str) -> None:
    job = torch.load(source, weights_only=True)
    torch.set_num_threads(int(job["threads"]))
    _torchvision_importable()
    import breaching
    from breaching.cases.users import UserSingleStep

    cfg = breaching.get_config(overrides=["case=1_single_image_small", "attack=invertinggradients"])
    setup = dict(device=torch.device("cpu"), dtype=torch.float)
    torch.manual_seed(0)
    model, loss_fn = breaching.cases.construct_model(cfg.case.model, cfg.case.data, pretrained=False)
    wanted = model.state_dict()  # the library wraps the network as ``model.model``
    state = {f"model.{key}": value for key, value in job["state"].items() if f"model.{key}" in wanted}
    model.load_state_dict(state, strict=True)
    server = breaching.cases.construct_server(model, loss_fn, cfg.case, setup)
    model = server.vet_model(model)
    images, labels = job["images"], job["labels"]
    cfg.case.user.num_data_points = images.shape[0]
    mean = torch.as_tensor(list(cfg.case.data.mean))[None, :, None, None]
    std = torch.as_tensor(list(cfg.case.data.std))[None, :, None, None]
    loader = [{"inputs": (images - mean) / std, "labels": labels}]  # in place of the CIFAR-10 download
    user = UserSingleStep(model, loss_fn, loader, setup, idx=0, cfg_user=cfg.case.user)
    payload = server.distribute_payload()
    shared, _ = user.compute_local_updates(payload)
    attacker = breaching.attacks.prepare_attack(server.model, server.loss, cfg.attack, setup)
    recorder = _Recorder(images, mean, std, float(job["cap"]), int(job["record_every"]))
    prepare, init_optimizer = attacker.prepare_attack, attacker._init_optimizer

    def prepare_recording(*args):
        rec_models, labels_, _ = prepare(*args)
        return rec_models, labels_, recorder

    def optimizer_watched(candidates):
        recorder.candidate = candidates[0]
        return init_optimizer(candidates)

    attacker.prepare_attack, attacker._init_optimizer = prepare_recording, optimizer_watched
    recorder.start = time.perf_counter()
    result, _ = attacker.reconstruct([payload], [shared], {}, dryrun=False)
    seconds = time.perf_counter() - recorder.start - recorder.overhead
    final = (result["data"] * std + mean).clamp(0, 1)
    torch.save({"curve": recorder.curve, "images": final, "iterations": recorder.iteration, "seconds": seconds,
                "gradient": [g.detach() for g in shared["gradients"]],
                "max_iterations": int(cfg.attack.optim.max_iterations), "tv": float(cfg.attack.regularization.total_variation.scale)},
               target)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
