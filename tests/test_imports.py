"""grpo_lib's import graph has no cycle (issue 14, item 7), walked with ``ast`` over every module.

Both module-level imports and imports inside functions count: a deferred import is still a dependency, and
deferring it only hides a cycle until the function runs. The implicit import of a parent package
(``grpo_lib.policies`` when ``grpo_lib.policies.base`` is imported) is not an edge: a package's
``__init__`` importing its own children is how packages work, not a cycle between concepts.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).parents[1] / "grpo_lib"


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the grpo_lib modules it imports anywhere in its source (``from a import b`` counts a.b
    when b is a module, else a)."""
    mods = _modules()
    graph = {}
    for name, f in mods.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                subs = {f"{target}.{a.name}" for a in node.names} & set(mods)
                deps |= subs or ({target} & set(mods))
        deps.discard(name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walker_finds_a_cycle_and_resolves_relative_imports():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    g = import_graph()
    assert "grpo_lib.policies.base" in g["grpo_lib.policies.tiny"]          # from .base import ...
    assert "grpo_lib.checkpoints" in g["grpo_lib.train"]                     # from grpo_lib import checkpoints
    assert "grpo_lib.policies.showo2" in g["grpo_lib.checkpoints"]           # a function-level import counts


def test_grpo_lib_has_no_import_cycle():
    assert cycles(import_graph()) == []
    assert "grpo_lib.train" not in import_graph()["grpo_lib.policies.showo2"]


def test_the_policy_contract_replaces_getattr_probes():
    from grpo_lib.policies.base import Policy
    from grpo_lib.policies.tiny import TinyConfig, TinyPolicy

    src = (PKG / "train.py").read_text()
    assert "getattr(self.policy" not in src and 'hasattr(self.policy' not in src
    policy = TinyPolicy(TinyConfig(block_out_channels=(8, 16, 16), norm_num_groups=4, attention_heads=2, text_dim=16,
                                   text_heads=2, text_layers=1))
    assert isinstance(policy, Policy) and policy.has_frozen_reference is False
    policy.train()
    policy.train_mode(True)            # every shipped policy stays in eval: the update recomputes the rollout
    assert not policy.unet.training


def _definitions(name: str) -> list[str]:
    """Modules of grpo_lib that define a function / class / module-level constant called ``name``."""
    out = []
    for f in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
                out.append(f.relative_to(PKG).as_posix())
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    out.append(f.relative_to(PKG).as_posix())
    return out


def test_one_definition_per_primitive():
    """Issue 14 item 8: each primitive is written once and imported elsewhere."""
    assert _definitions("flow_matching_loss") == ["flow_matching.py"]
    assert _definitions("sample_timesteps") == ["flow_matching.py"] and _definitions("sample_t") == []
    assert _definitions("CONVENTIONS") == ["sde.py"] and _definitions("check_convention") == ["sde.py"]
    assert _definitions("draw_noise") == ["sde.py"] and _definitions("_initial_noise") == []
    assert _definitions("check_images") == ["rewards/detector.py"]
    assert _definitions("check_velocity_args") == ["policies/base.py"]
    assert _definitions("atomic_save_dir") == ["checkpoints.py"] and _definitions("atomic_write_text") == ["checkpoints.py"]
    # seed hashing: blake2b-to-seed lives in seeding.py only (train's weights_digest hashes weights, not seeds)
    hashing = [f.relative_to(PKG).as_posix() for f in PKG.rglob("*.py") if "blake2b(" in f.read_text()]
    assert sorted(hashing) == ["seeding.py", "train.py"]
    assert "blake2b(digest_size=6)" in (PKG / "train.py").read_text()
    # the logit-normal sampler and the rectified-flow target are computed in flow_matching.py only
    assert [f.name for f in PKG.rglob("*.py") if "torch.sigmoid(mean + std" in f.read_text()] == ["flow_matching.py"]
    assert "policy._net(" not in (PKG / "pretrain.py").read_text()
