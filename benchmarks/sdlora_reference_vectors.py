"""Record SD-LoRA test vectors produced by the OFFICIAL code (WuYichen-97/SD-Lora-CL).

    python benchmarks/sdlora_reference_vectors.py --official /path/to/SD-Lora-CL \
        --out tests/data/sdlora_official.safetensors

``--official`` is either a checkout (work tree) of the official repository or a bare git
directory (e.g. the mirror from ``fetch``; then ``--rev`` picks the commit, default HEAD).
Nothing of the official code is stored in this project: ``backbone/lora.py`` and the two
modules it imports (``backbone/base_vit.py``, ``backbone/linears.py``) are copied into a
temporary folder at run time and imported from there with importlib.

Workarounds needed to run the official module on a CPU and a current torch (nothing in its
source is edited):
  * ``nn.Module.cuda`` and ``torch.Tensor.cuda`` patched to return ``self`` (the wrappers call
    ``.cuda()`` in ``__init__``, ``backbone/lora.py:136-142``);
  * ``torch.load`` called with ``weights_only=False`` by default (old A/B are pickled lists of
    ``nn.Linear``, ``backbone/lora.py:319-324``; torch >= 2.6 refuses them otherwise);
  * ``einops`` (imported at ``backbone/lora.py:9`` but never used) is stubbed if not installed;
  * the official constructor keeps ``filepath`` as a string *prefix* (``save_file + 'lora_w_a_0.pt'``),
    so the temp folder is passed with a trailing separator;
  * the ViT given to ``LoRA_ViT_timm`` is modified in place, so every task gets a fresh deep copy
    of the same tiny random ViT (the official learner re-creates the pretrained ViT instead).

No network access is needed (``pretrained=False``). Everything is written to one safetensors
file; a JSON string under metadata key ``meta`` describes it (see tests/data/README.md).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import types

import torch
import torch.nn as nn

OFFICIAL_FILES = ("backbone/lora.py", "backbone/base_vit.py", "backbone/linears.py")

VIT_NAME = "vit_base_patch16_224"
VIT_KWARGS = dict(pretrained=False, num_classes=0, depth=2, embed_dim=64, num_heads=2,
                  img_size=32, patch_size=8)
RANK = 10
N_TASKS = 3
OLD_ALPHAS = (0.7, 1.3)      # alpha_0, alpha_1 (official wrapped_param_prev[0], [1])
CUR_ALPHA = 0.9              # alpha_t          (official wrapped_param[0])
B_STD = 0.02
SEED = 0
NORM_EPS = 0.01              # item 2: A_0 rows = a + NORM_EPS * noise, columns of B_0 sum to 0


# --------------------------------------------------------------------------- official code
def _git(git_dir: str, *args: str) -> bytes:
    return subprocess.run(["git", "--git-dir", git_dir, *args], check=True,
                          capture_output=True).stdout


def _is_git_dir(path: str) -> bool:
    try:
        return _git(path, "rev-parse", "--is-bare-repository").strip() in (b"true", b"false")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return False


def extract_official(official: str, rev: str, dest: str) -> dict:
    """Copy the official backbone files into dest/backbone/; return provenance info."""
    os.makedirs(os.path.join(dest, "backbone"), exist_ok=True)
    with open(os.path.join(dest, "backbone", "__init__.py"), "w"):
        pass
    info: dict = {"official_source": os.path.abspath(official)}
    worktree = os.path.isfile(os.path.join(official, "backbone", "lora.py"))
    if worktree:
        for rel in OFFICIAL_FILES:
            shutil.copyfile(os.path.join(official, rel), os.path.join(dest, rel))
        try:
            info["official_commit"] = subprocess.run(
                ["git", "-C", official, "rev-parse", "HEAD"], check=True,
                capture_output=True, text=True).stdout.strip()
            dirty = subprocess.run(["git", "-C", official, "status", "--porcelain", "--",
                                    *OFFICIAL_FILES], capture_output=True, text=True).stdout
            info["official_worktree_dirty"] = bool(dirty.strip())
        except (subprocess.CalledProcessError, FileNotFoundError):
            info["official_commit"] = "unknown (not a git checkout)"
    elif _is_git_dir(official):
        info["official_commit"] = _git(official, "rev-parse", rev).decode().strip()
        for rel in OFFICIAL_FILES:
            blob = _git(official, "show", f"{info['official_commit']}:{rel}")
            with open(os.path.join(dest, rel), "wb") as fh:
                fh.write(blob)
    else:
        raise SystemExit(f"--official {official!r}: neither a checkout with backbone/lora.py "
                         "nor a git directory")
    info["official_sha256"] = {}
    for rel in OFFICIAL_FILES:
        with open(os.path.join(dest, rel), "rb") as fh:
            info["official_sha256"][rel] = hashlib.sha256(fh.read()).hexdigest()
    return info


@contextlib.contextmanager
def cpu_patches():
    """Patches the brief / spec ask for; all undone on exit."""
    orig_mod_cuda, orig_t_cuda, orig_load = nn.Module.cuda, torch.Tensor.cuda, torch.load

    def _load(*args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return orig_load(*args, **kwargs)

    nn.Module.cuda = lambda self, *a, **k: self
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.load = _load
    try:
        yield
    finally:
        nn.Module.cuda, torch.Tensor.cuda, torch.load = orig_mod_cuda, orig_t_cuda, orig_load


def import_official(dest: str):
    patched = []
    try:
        importlib.import_module("einops")
    except ImportError:          # lora.py:9 imports einops.rearrange but never uses it
        stub = types.ModuleType("einops")
        stub.rearrange = None
        sys.modules["einops"] = stub
        patched.append("einops stubbed (not installed; unused by backbone/lora.py)")
    for name in [m for m in sys.modules if m == "backbone" or m.startswith("backbone.")]:
        del sys.modules[name]
    sys.path.insert(0, dest)
    try:
        lora = importlib.import_module("backbone.lora")
    finally:
        sys.path.remove(dest)
    return lora, patched


# --------------------------------------------------------------------------- helpers
def blocks_ab(model, n_blocks):
    """Current-task A/B per block, in the official list layout w_As[2b]=q, w_As[2b+1]=v."""
    out = {}
    for b in range(n_blocks):
        for j, kind in enumerate(("q", "v")):
            out[(b, kind, "A")] = model.w_As[2 * b + j].weight
            out[(b, kind, "B")] = model.w_Bs[2 * b + j].weight
    return out


def set_alphas(model, old, cur):
    with torch.no_grad():
        for i, a in enumerate(old):
            model.wrapped_param_prev[i].param.fill_(a)
        model.wrapped_param[0].param.fill_(cur)


def grad_status(t):
    if t.grad is None:
        return "none"
    return "zero" if bool((t.grad == 0).all()) else "nonzero"


def build(lora, vit, task, filepath):
    kwargs = dict(vit_model=copy.deepcopy(vit).eval(), r=RANK, num_classes=10, increment=10,
                  filepath=filepath)
    if task == 0:      # as utils/inc_net.py:15 (index=True, no cur_task_index)
        return lora.LoRA_ViT_timm(**kwargs)
    # as models/sdlora.py:87-88 via update_network(index=False)
    return lora.LoRA_ViT_timm(**kwargs, index=False, cur_task_index=task)


# --------------------------------------------------------------------------- recording
def make_vit():
    """The tiny random ViT, fp32. timm's init leaves biases / cls / pos at 0 and norms at 1, so
    those are redrawn to make no slice of the computation trivial."""
    import timm

    torch.manual_seed(SEED)
    vit = timm.create_model(VIT_NAME, **VIT_KWARGS).to(torch.float32)
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1 or "bias" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif name in ("cls_token", "pos_embed"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return vit.eval()


def run(lora, vit_fp32, dtype, workdir, ref=None):
    """Runs every scenario in `dtype`. With `ref` (the tensors of an fp32 run) every input, A
    and B is copied from it instead of drawn, so an fp64 rerun sees exactly the same values."""
    prev_default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)   # the official code creates nn.Linear / torch.Tensor([0.8])
    try:
        torch.manual_seed(SEED)
        vit = copy.deepcopy(vit_fp32).to(dtype).eval()
        n_blocks = len(vit.blocks)
        d = vit.embed_dim
        n_tokens = vit.patch_embed.num_patches + 1

        gx = torch.Generator().manual_seed(SEED + 2)
        f32 = dict(dtype=torch.float32)
        x = torch.randn(2, 3, VIT_KWARGS["img_size"], VIT_KWARGS["img_size"], generator=gx, **f32)
        x_tokens = torch.randn(2, n_tokens, d, generator=gx, **f32)
        if ref is not None:
            x, x_tokens = ref["x"], ref["x_tokens"]
        xd, xtd = x.to(dtype), x_tokens.to(dtype)

        T: dict[str, torch.Tensor] = {}
        grads: dict = {}
        T["x"], T["x_tokens"] = x, x_tokens

        def fill(prefix, model, draw):
            """Set every block's A/B: from ref if given, else draw(b, kind, mat, w) (None keeps w)."""
            with torch.no_grad():
                for (b, kind, mat), w in blocks_ab(model, n_blocks).items():
                    v = ref[f"{prefix}.block{b}.{kind}.{mat}"] if ref is not None else draw(b, kind, mat, w)
                    if v is not None:
                        w.copy_(v)

        def record_ab(prefix, model):
            for (b, kind, mat), w in blocks_ab(model, n_blocks).items():
                T[f"{prefix}.block{b}.{kind}.{mat}"] = w.detach().clone()

        def forward_outputs(prefix, model):
            with torch.no_grad():
                T[f"{prefix}.features"] = model(xd).clone()
                T[f"{prefix}.block0.qkv"] = model.lora_vit.blocks[0].attn.qkv(xtd).clone()

        # ---------------- main scenario: tasks 0, 1, 2
        ckpt = os.path.join(workdir, f"main_{str(dtype).split('.')[-1]}") + os.sep
        gb = torch.Generator().manual_seed(SEED + 3)
        models = {}
        for t in range(N_TASKS):
            model = build(lora, vit, t, ckpt)
            assert model.task_id == t
            # A: kept as the official reset_parameters drew it (kaiming_uniform_(a=sqrt 5), global
            # generator seeded above); B ~ N(0, B_STD) from a fixed generator.
            fill(f"task{t}", model, lambda b, kind, mat, w: None if mat == "A"
                 else B_STD * torch.randn(w.shape, generator=gb, dtype=torch.float32))
            set_alphas(model, OLD_ALPHAS[:t], CUR_ALPHA)
            record_ab(f"task{t}", model)
            forward_outputs(f"task{t}", model)
            models[t] = model
            if t < N_TASKS - 1:
                model.save_lora_parameters(ckpt, t)          # official save (lora.py:401-406)

        m2 = models[N_TASKS - 1]
        # old A/B as the official code loaded them (must equal what was saved)
        for i in range(N_TASKS - 1):
            sa, sb = m2.lora_vit.blocks[0].attn.qkv.saved_A, m2.lora_vit.blocks[0].attn.qkv.saved_B
            for b in range(n_blocks):
                for j, kind in enumerate(("q", "v")):
                    assert torch.equal(sa[f"saved_A_{i}"][2 * b + j].weight, T[f"task{i}.block{b}.{kind}.A"])
                    assert torch.equal(sb[f"saved_B_{i}"][2 * b + j].weight, T[f"task{i}.block{b}.{kind}.B"])

        # item 5: boundary, every alpha re-created at 0.8 (official default, not re-set)
        fresh = build(lora, vit, N_TASKS - 1, ckpt)
        assert all(float(p.param.detach()) == float(torch.tensor(0.8, dtype=dtype)) for p in fresh.wrapped_param_prev)
        assert float(fresh.wrapped_param[0].param.detach()) == float(torch.tensor(0.8, dtype=dtype))
        with torch.no_grad():
            for (b, kind, mat), w in blocks_ab(fresh, n_blocks).items():
                w.copy_(T[f"task{N_TASKS - 1}.block{b}.{kind}.{mat}"].to(dtype))
        forward_outputs(f"task{N_TASKS - 1}_default_alpha", fresh)

        # gradients at task 2 (item 3/4): backward of features.sum(), with B_2 random and B_2 = 0
        def grad_case(prefix, model):
            model.zero_grad(set_to_none=True)
            feats = model(xd)
            feats.sum().backward()
            table = {}
            for name, p in model.named_parameters():
                table[name] = {"status": grad_status(p), "requires_grad": p.requires_grad}
            qkv0 = model.lora_vit.blocks[0].attn.qkv
            for key in ("saved_A", "saved_B"):
                for i in range(model.task_id):
                    for k, mod in enumerate(getattr(qkv0, key)[f"{key}_{i}"]):
                        table[f"<loaded {key}_{i}[{k}]>.weight"] = {
                            "status": grad_status(mod.weight),
                            "requires_grad": mod.weight.requires_grad}
            sem = {}
            for (b, kind, mat), w in blocks_ab(model, n_blocks).items():
                sem[f"task{model.task_id}.block{b}.{kind}.{mat}"] = grad_status(w)
                T[f"{prefix}.grad.block{b}.{kind}.{mat}"] = w.grad.detach().clone()
            for i in range(model.task_id):
                for b in range(n_blocks):
                    for j, kind in enumerate(("q", "v")):
                        for key, mat in (("saved_A", "A"), ("saved_B", "B")):
                            mod = getattr(model.lora_vit.blocks[b].attn.qkv, key)[f"{key}_{i}"][2 * b + j]
                            sem[f"task{i}.block{b}.{kind}.{mat}"] = grad_status(mod.weight)
            for i, pw in enumerate(model.wrapped_param_prev):
                sem[f"alpha.prev{i}"] = grad_status(pw.param)
                if pw.param.grad is not None:
                    T[f"{prefix}.grad.alpha.prev{i}"] = pw.param.grad.detach().clone()
            sem["alpha.cur"] = grad_status(model.wrapped_param[0].param)
            T[f"{prefix}.grad.alpha.cur"] = model.wrapped_param[0].param.grad.detach().clone()
            vit_status = sorted({v["status"] for k, v in table.items() if k.startswith(("lora_vit.", "base_vit."))
                                 and ".linear_" not in k})
            sem["vit.* (all frozen ViT params, lora_vit.* and base_vit.*)"] = "/".join(vit_status)
            T[f"{prefix}.features"] = feats.detach().clone()
            model.zero_grad(set_to_none=True)
            return {"official_names": table, "semantic": sem}

        grads["task2"] = grad_case("task2", m2)
        with torch.no_grad():
            for w in m2.w_Bs:
                w.weight.zero_()
        grads["task2_zeroB"] = grad_case("task2_zeroB", m2)
        with torch.no_grad():
            T["task2_zeroB.block0.qkv"] = m2.lora_vit.blocks[0].attn.qkv(xtd).clone()

        # ---------------- item 2: ||B_0 A_0|| << ||B_0|| ||A_0||
        ckpt_n = os.path.join(workdir, f"norm_{str(dtype).split('.')[-1]}") + os.sep
        gn = torch.Generator().manual_seed(SEED + 5)
        m0 = build(lora, vit, 0, ckpt_n)
        ratios = {}

        def draw_norm(b, kind, mat, w):
            if mat == "A":       # every row close to one vector a
                a = torch.randn(1, d, generator=gn, **f32) / d ** 0.5
                return a + NORM_EPS * torch.randn(RANK, d, generator=gn, **f32) / d ** 0.5
            bm = B_STD * torch.randn(d, RANK, generator=gn, **f32)   # columns sum to 0 -> B 1 = 0
            return bm - bm.mean(dim=1, keepdim=True)

        fill("norm.task0", m0, draw_norm)
        with torch.no_grad():
            for b in range(n_blocks):
                for kind in ("q", "v"):
                    ab = blocks_ab(m0, n_blocks)
                    A, B = ab[(b, kind, "A")], ab[(b, kind, "B")]
                    ratios[f"block{b}.{kind}"] = float(torch.linalg.norm(B @ A) /
                                                       (torch.linalg.norm(B) * torch.linalg.norm(A)))
        set_alphas(m0, (), CUR_ALPHA)
        record_ab("norm.task0", m0)
        m0.save_lora_parameters(ckpt_n, 0)
        m1 = build(lora, vit, 1, ckpt_n)
        fill("norm.task1", m1, lambda b, kind, mat, w: None if mat == "A"
             else B_STD * torch.randn(w.shape, generator=gn, dtype=torch.float32))
        set_alphas(m1, OLD_ALPHAS[:1], CUR_ALPHA)
        record_ab("norm.task1", m1)
        forward_outputs("norm.task1", m1)

        meta = {"grads": grads, "norm_ratio_BA_over_B_times_A": ratios,
                "n_blocks": n_blocks, "embed_dim": d, "n_tokens": n_tokens}
        return T, meta
    finally:
        torch.set_default_dtype(prev_default)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", required=True, help="checkout or git dir of WuYichen-97/SD-Lora-CL")
    ap.add_argument("--rev", default="HEAD", help="commit to read when --official is a git dir")
    ap.add_argument("--out", default="tests/data/sdlora_official.safetensors")
    args = ap.parse_args(argv)

    import timm
    from safetensors.torch import save_file

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="sdlora_official_") as tmp:
        src = os.path.join(tmp, "src")
        info = extract_official(args.official, args.rev, src)
        with cpu_patches():
            lora, notes = import_official(src)
            vit = make_vit()
            vit_state = {k: v.detach().clone() for k, v in vit.state_dict().items()}
            T, meta = run(lora, vit, torch.float32, os.path.join(tmp, "ckpt"))
            T64, meta64 = run(lora, vit, torch.float64, os.path.join(tmp, "ckpt"), ref=T)

    # official code's own fp32-vs-fp64 difference, as a tolerance guide for our tests
    fp64_diff = {}
    for k, v in T.items():
        if k.endswith((".features", ".qkv")) or ".grad." in k:
            ref = T64[k]
            fp64_diff[k] = {"max_abs": float((v.double() - ref).abs().max()),
                            "max_rel": float((v.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))}
    assert meta["grads"] == meta64["grads"], "fp32 and fp64 gradient tables differ"

    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in T.items()}
    for k, v in vit_state.items():
        tensors[f"vit.{k}"] = v.contiguous()

    meta_out = {
        "format": "sdlora-official-vectors/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/sdlora_reference_vectors.py --official <path> --out " + args.out,
        "official_repo": "https://github.com/WuYichen-97/SD-Lora-CL",
        **info,
        "torch": torch.__version__, "timm": timm.__version__, "python": sys.version.split()[0],
        "dtype": "float32 (a float64 rerun is used only for fp64_vs_fp32)", "device": "cpu",
        "workarounds": ["nn.Module.cuda -> self", "torch.Tensor.cuda -> self",
                        "torch.load(weights_only=False)", "filepath passed with trailing os.sep",
                        "fresh deepcopy of the tiny ViT per task (official re-creates the pretrained ViT)",
                        *notes],
        "vit_name": VIT_NAME, "vit_kwargs": VIT_KWARGS,
        "vit_init": "timm init with seed 0, then norms/biases/cls/pos redrawn (see make_vit); state in vit.*",
        "a_init": "main scenario: A_t as the official reset_parameters drew it (kaiming_uniform_, a=sqrt 5)",
        "embed_dim": meta["embed_dim"], "n_blocks": meta["n_blocks"], "n_tokens": meta["n_tokens"],
        "rank": RANK, "n_tasks": N_TASKS, "seed": SEED, "b_std": B_STD,
        "alphas": {f"task{t}": {"old": list(OLD_ALPHAS[:t]), "cur": CUR_ALPHA} for t in range(N_TASKS)},
        "alphas_norm_case": {"task1": {"old": list(OLD_ALPHAS[:1]), "cur": CUR_ALPHA}},
        "alphas_default": 0.8,
        "qkv_layout": "fused qkv output rows [0:d]=q (+dq), [d:2d]=k (frozen), [2d:3d]=v (+dv); "
                      "official list layout w_As[2*b]=q, w_As[2*b+1]=v",
        "naming": {
            "vit.<timm key>": "tiny ViT state_dict (fp32), load into timm.create_model(vit_name, **vit_kwargs)",
            "x": "(2,3,H,W) image batch; x_tokens: (2,N,d) input of block 0's qkv (i.e. after norm1)",
            "task{t}.block{b}.{q|v}.{A|B}": "A: (r,d) down, B: (d,r) up, as used at task t (old ones as saved/loaded)",
            "task{t}.features": "model(x) of the task-t model (CLS after final norm), alphas of meta.alphas[task{t}]",
            "task{t}.block0.qkv": "block 0 wrapped qkv(x_tokens) of the task-t model, (2,N,3d)",
            "task2_default_alpha.{features,block0.qkv}": "task-2 model, same A/B, every alpha left at the official 0.8",
            "task2.grad.*": "grads after model(x).sum().backward() at task 2, B_2 random (task2.* A/B): "
                            "grad.block{b}.{q|v}.{A|B} for A_2/B_2, grad.alpha.prev{i}, grad.alpha.cur",
            "task2_zeroB.*": "same with every B_2 = 0 (spec item 4): features, block0.qkv, grad.*",
            "norm.task{0,1}.block{b}.{q|v}.{A|B}, norm.task1.{features,block0.qkv}":
                "spec item 2: ||B_0 A_0|| << ||B_0|| ||A_0|| (ratios in norm_ratio_BA_over_B_times_A); "
                "task 1 alphas old (0.7,) cur 0.9",
        },
        "grad_tables": meta["grads"],
        "grad_status_legend": "none = .grad is None; zero = grad exactly 0; nonzero otherwise",
        "norm_ratio_BA_over_B_times_A": meta["norm_ratio_BA_over_B_times_A"],
        "fp64_vs_fp32": fp64_diff,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file(tensors, args.out, metadata={"meta": json.dumps(meta_out, sort_keys=True)})
    size = os.path.getsize(args.out)
    print(f"wrote {args.out}: {len(tensors)} tensors, {size / 1024:.1f} KiB, official commit "
          f"{info.get('official_commit')}")
    worst = max(fp64_diff.items(), key=lambda kv: kv[1]["max_rel"])
    print(f"largest fp32-vs-fp64 relative difference: {worst[0]} {worst[1]['max_rel']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
