"""The method registry: lookups, presets, lazy loading, no branching on method names, and a new method end to end."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fastmae.config import parse_overrides, pretrain_presets
from fastmae.layers import Block
from fastmae.methods import MethodSpec, get_method, list_methods, register_method, registry
from fastmae.reference import patchify

ROOT = Path(__file__).parent.parent


def test_builtin_methods_and_their_presets():
    assert set(list_methods()) >= {"mae", "simmim", "videomae"}
    presets = pretrain_presets()
    for method in list_methods():
        spec = get_method(method)
        assert spec.name == method and spec.models
        for name, preset in spec.presets.items():
            assert presets[name] is preset
            cfg = parse_overrides([f"--preset={name}"])
            assert spec.resolve_model(cfg.model.name) in spec.models
        if spec.default_preset:
            assert spec.default_preset in spec.presets
    assert {"tiny", "base", "huge", "simmim_tiny", "videomae_vit_base"} <= set(presets)


def test_method_flag_picks_its_default_preset_and_size_sibling():
    assert parse_overrides(["--method=simmim"]).model.name == "simmim_vit_tiny"
    assert parse_overrides(["--method=videomae"]).preset == "videomae_tiny"
    assert get_method("simmim").resolve_model("mae_vit_base_patch16") == "simmim_vit_base_patch16"
    with pytest.raises(ValueError, match="not a mae model"):
        get_method("mae").resolve_model("simmim_vit_tiny")


def test_unknown_method_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown method 'byol'; choose one of .*mae"):
        get_method("byol")
    with pytest.raises(ValueError, match="unknown method 'byol'"):
        parse_overrides(["--method=byol"])
    with pytest.raises(ValueError, match="method must be one of"):
        parse_overrides(["--preset=tiny", "--method=byol"])


def test_a_name_is_registered_once(monkeypatch):
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    spec = get_method("mae")
    assert register_method(spec) is spec  # re-registering the same spec (a module imported twice) is harmless
    with pytest.raises(ValueError, match="already registered"):
        register_method(MethodSpec(name="mae", models={}, model_kwargs=dict, noise_shape=lambda m, b: ()))


def test_importing_the_registry_and_config_loads_no_method():
    code = ("import sys, fastmae.config, fastmae.methods; "
            "print(sorted(m for m in sys.modules if m.startswith('fastmae.methods.') and m != 'fastmae.methods.registry'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"


def test_meta_models_give_architecture_facts_without_weights():
    from fastmae.eval.models import named_heads

    model = registry.build_meta_model("mae_vit_huge_patch14")
    assert model.pos_embed.is_meta and len(model.blocks) == 32
    assert named_heads("mae_vit_tiny") == (3, 4) and named_heads("vit_base_patch16") == (12, 16)
    assert named_heads("videomae_vit_base_patch16") == (12, 6) and named_heads("simmim_vit_tiny") == (3, None)
    assert named_heads("resnet50") is None and registry.build_meta_model("resnet50") is None


# ---- no method names outside their own files -----------------------------------------------------------------


def _method_name_comparisons(path: Path, names: set[str]) -> list[str]:
    """Branches on a method name in one file: an expression about a method (``cfg.method.name``, ``method``) compared
    with a literal (``cfg.method.name == "mae"``, ``match method: case "simmim"``), or a literal list of two or more
    method names (``m in ("mae", "simmim")``). A policy that merely shares a name (``augment in ("mae", "eval")``)
    is not a branch on the method."""
    found = []

    def literal(node) -> bool:
        return isinstance(node, ast.Constant) or (
            isinstance(node, (ast.Tuple, ast.List, ast.Set)) and all(isinstance(e, ast.Constant) for e in node.elts))

    def about_method(node) -> bool:
        idents = (n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(node) if isinstance(n, (ast.Name, ast.Attribute)))
        return any(i in ("method", "method_name") or i.endswith("_method") for i in idents)

    def several_names(node) -> bool:
        return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and sum(
            isinstance(e, ast.Constant) and e.value in names for e in node.elts) >= 2

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare):
            sides = (node.left, *node.comparators)
            on_method = any(about_method(n) for n in sides if not literal(n)) and any(map(literal, sides))
            if on_method or any(map(several_names, sides)):
                found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Match) and about_method(node.subject):
            for case in node.cases:
                if any(isinstance(q, ast.MatchValue) and literal(q.value) for q in ast.walk(case.pattern)):
                    where = f"{path}:{case.pattern.lineno}"
                    found.append(f"{where}: match {ast.unparse(node.subject)}: case {ast.unparse(case.pattern)}")
    return found


def test_nothing_branches_on_a_method_name_outside_its_method_file():
    names = set(list_methods())
    own = {ROOT / "fastmae" / "methods" / f"{n}.py" for n in names}
    files = [p for d in ("fastmae", "kernels") for p in (ROOT / d).rglob("*.py") if p not in own]
    assert len(files) > 30
    found = [hit for p in files for hit in _method_name_comparisons(p, names)]
    assert not found, "branch on a method name (ask fastmae.methods.get_method instead):\n" + "\n".join(found)


def test_the_scan_finds_a_branch(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('def f(cfg, m, method, augment):\n    if cfg.method.name == "x":\n        pass\n'
                   '    match method:\n        case "simmim":\n            pass\n'
                   '    if augment in ("mae", "eval") or cfg.method.name in known():\n        pass\n'
                   '    return m in ("simmim", "mae")\n')
    hits = _method_name_comparisons(bad, {"simmim", "mae"})
    assert sorted(int(h.split(":")[1]) for h in hits) == [2, 5, 9], hits


# ---- a new method through the real training loop ------------------------------------------------------------


class TwoBlockMIM(nn.Module):
    """A minimal masked-image model: masked patch tokens replaced by a mask token, 2 blocks, MSE on masked patches."""

    def __init__(self, img_size: int = 16, patch_size: int = 4, dim: int = 32):
        super().__init__()
        self.patch_size, self.num_patches = patch_size, (img_size // patch_size) ** 2
        self.embed = nn.Linear(patch_size * patch_size * 3, dim)
        self.pos = nn.Parameter(torch.zeros(1, self.num_patches, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList([Block(dim, 2) for _ in range(2)])
        self.head = nn.Linear(dim, patch_size * patch_size * 3)

    def forward(self, imgs, mask_ratio: float = 0.5, noise=None):
        target = patchify(imgs, self.patch_size)
        N, L, _ = target.shape
        noise = torch.rand(N, L, device=imgs.device) if noise is None else noise
        n_keep = int(L * (1 - mask_ratio))
        mask = torch.ones(N, L, device=imgs.device).scatter_(1, torch.argsort(noise, 1)[:, :n_keep], 0.0)
        x = torch.where(mask[..., None] > 0, self.mask_token, self.embed(target)) + self.pos
        for blk in self.blocks:
            x = blk(x)
        pred = self.head(x)
        loss = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
        return loss, pred, mask


def test_a_registered_toy_method_trains_through_the_real_loop(tmp_path, monkeypatch):
    from fastmae.pretrain import main

    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    register_method(MethodSpec(
        name="toymim", models={"toymim_2block": TwoBlockMIM},
        model_kwargs=lambda cfg: dict(img_size=cfg.data.img_size, patch_size=cfg.model.patch_size),
        noise_shape=lambda model, batch: (batch.shape[0], model.num_patches),
        presets={"toymim_tiny": dict(method="toymim", model="toymim_2block", img_size=16, patch_size=4, mask_ratio=0.5,
                                     batch_size=8, epochs=1, warmup_epochs=0.0, blr=1e-3)},
        default_preset="toymim_tiny",
    ))
    out = tmp_path / "toy"
    summary = main(["--method=toymim", "--loader=synthetic", "--data=none", f"--output_dir={out}", "--max_steps=2",
                    "--log_every=1", "--num_workers=0", "--progress=false", "--precision=fp32"])
    assert summary["status"] == "done" and summary["step"] == 2 and summary["skipped_steps"] == 0
    assert summary["val_images"] > 0 and summary["val_loss"] > 0 and "reconstructions" not in summary
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    ckpt = torch.load(out / "checkpoint-00000002.pt", weights_only=True)
    assert ckpt["config"]["method"] == "toymim" and "blocks.1.attn.qkv.weight" in ckpt["model"]
