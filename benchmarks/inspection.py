"""The client's model inspection (defense ``inspect-model``) against the malicious-server attacks.

    .venv/bin/python benchmarks/inspection.py --seeds 100

False positives: honest zoo initialisations (100 seeds each) inspected on 8 built-in faces.
Detection: imprint modules (bins 32..1024) in front of LeNet, and trap weights at rates
0.005..0.3 on a 1000-unit MLP, fishing on LeNet and an MLP, each for 20 seeds; plus how many samples the attack would
have recovered at that setting (what evading the check costs the attacker).
"""

from __future__ import annotations

import argparse

import torch

import gradleak as gl
from gradleak.attacks import ImprintAttack, TrapWeights
from gradleak.attacks.malicious import ClassFishing
from gradleak.data import load_builtin
from gradleak.defenses import inspect_model
from gradleak.metrics import match, psnr

HONEST = (("mlp", {}), ("mlp", {"hidden": "1000"}), ("two-layer", {}), ("lenet", {}), ("convnet", {"width": 4}),
          ("resnet20", {}))


def _exact(attack, served, images, labels, spec) -> int:
    update = gl.fedsgd_update(served, images, labels, spec=spec)
    rec = attack.reconstruct(update)
    return int((psnr(rec.images[match(rec.images, images)].clamp(0, 1), images) >= 60).sum())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    faces = load_builtin("faces")
    spec = gl.DataSpec.from_images(faces.images[100:])
    public, batch = spec.normalize(faces.images[150:]), faces.images[:args.batch]
    inputs, labels = spec.normalize(batch), faces.labels[:args.batch]
    print("| honest model | flagged of", args.seeds, "|")
    for name, options in HONEST:
        flagged = sum(bool(inspect_model(gl.ModelSpec(name, options, seed=s).build((1, 25, 25), 2).module, inputs))
                      for s in range(args.seeds))
        print(f"| {name} {options or ''} | {flagged} |")
    threat = gl.ThreatModel(server="malicious")
    print(f"| malicious model (B={args.batch}) | detected of 20 | samples recovered exactly (mean) |")
    for bins in (32, 128, 1024):
        detected, exact = 0, 0
        for s in range(20):
            model = gl.ModelSpec("lenet", seed=s).build((1, 25, 25), 2).module
            attack = ImprintAttack(model, threat, bins=bins, seed=s)
            served = attack.serve(model, (1, 25, 25), public)
            detected += bool(inspect_model(served, inputs))
            exact += _exact(attack, served, batch, labels, spec)
        print(f"| imprint, {bins} bins | {detected} | {exact / 20:.1f} |")
    for rate in (0.005, 0.02, 0.05, 0.1, 0.2, 0.3):
        detected, exact = 0, 0
        for s in range(20):
            model = gl.ModelSpec("mlp", {"hidden": "1000"}, seed=s).build((1, 25, 25), 2).module
            attack = TrapWeights(model, threat, rate=rate, seed=s)
            served = attack.serve(model, (1, 25, 25), public)
            detected += bool(inspect_model(served, inputs))
            exact += _exact(attack, served, batch, labels, spec)
        print(f"| trap weights, rate {rate} | {detected} | {exact / 20:.1f} |")
    for name, options in (("lenet", {}), ("mlp", {})):
        detected = sum(bool(inspect_model(ClassFishing(model, threat, target=1).serve(model, (1, 25, 25), public),
                                          inputs))
                       for model in (gl.ModelSpec(name, options, seed=s).build((1, 25, 25), 2).module
                                     for s in range(20)))
        print(f"| fishing class 1, {name} | {detected} | (approximate attack) |")


if __name__ == "__main__":
    main()
