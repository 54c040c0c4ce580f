"""Each sampling / training knob has one shared params rule (grpo_lib.params.KNOB_RULES) and one math check.

Every params schema gives the same knob the same message; no module between the params layer and the math
raises its own ValueError for a shared knob, so a fifth copy of a rule cannot creep back in.
"""
import ast
import dataclasses
from pathlib import Path

import pytest

from grpo_lib.params import KNOB_RULES, SCHEMAS, load_params, schema_for

# one bad value per knob and the single message it must produce in every schema that has the knob
BAD = {
    "num_steps": (0, "num_steps=0 must be an int >= 1"),
    "eval_num_steps": (0, "eval_num_steps=0 must be an int >= 1"),
    "group_size": (1, "group_size=1 must be an int >= 2"),
    "batch_size": (0, "batch_size=0 must be an int >= 1"),
    "lora_rank": (0, "lora_rank=0 must be an int >= 1"),
    "noise_level": (-0.1, "noise_level=-0.1 must be a finite float >= 0"),
    "shift": (0.0, "shift=0.0 must be a finite float > 0"),
    "guidance_scale": (-1.0, "guidance_scale=-1.0 must be a finite float >= 0"),
    "train_guidance_scale": (-1.0, "train_guidance_scale=-1.0 must be a finite float >= 0"),
    "clip_range": (0.0, "clip_range=0.0 must be a finite float > 0"),
    "adv_clip_max": (0.0, "adv_clip_max=0.0 must be a finite float > 0"),
    "beta": (-0.01, "beta=-0.01 must be a finite float >= 0"),
    "lr": (0.0, "lr=0.0 must be a finite float > 0"),
    "lora_alpha": (0, "lora_alpha=0 must be a finite float > 0"),
    "ema_decay": (1.0, "ema_decay=1.0 must be a finite float in [0, 1)"),
}
CASES = [(name, knob) for name in SCHEMAS
         for knob in sorted(KNOB_RULES) if knob in {f.name for f in dataclasses.fields(schema_for(name))}]


def test_every_rule_has_a_case():
    assert set(BAD) == set(KNOB_RULES)


@pytest.mark.parametrize("schema,knob", CASES)
def test_same_knob_same_message_in_every_schema(schema, knob):
    value, message = BAD[knob]
    if (schema, knob) == ("02_counting_grpo", "noise_level"):   # the one stated difference of purpose
        message = "noise_level=-0.1 must be a finite float > 0 (objective grpo needs stochastic steps"
    with pytest.raises(ValueError) as e:
        schema_for(schema)(**{knob: value})
    assert str(e.value).startswith(message), str(e.value)


def test_grpo_noise_level_zero_uses_the_shared_rule_with_its_purpose():
    cls = schema_for("02_counting_grpo")
    with pytest.raises(ValueError, match=r"^noise_level=0.0 must be a finite float > 0 \(objective grpo"):
        cls(noise_level=0.0)
    assert cls(noise_level=0.0, objective="nft").noise_level == 0.0      # ODE rollouts are fine for nft
    assert schema_for("04_inference_preview")(noise_level=0.0).noise_level == 0.0   # ODE preview


def test_bools_and_non_finite_values_are_rejected():
    cls = schema_for("02_counting_grpo")
    with pytest.raises(ValueError, match=r"^num_steps=True must be an int >= 1$"):
        cls(num_steps=True)
    with pytest.raises(ValueError, match=r"^lr=inf must be a finite float > 0$"):
        cls(lr=float("inf"))


def test_load_params_names_the_set_origin():
    with pytest.raises(ValueError, match=r"^shift=0.0 must be a finite float > 0 \(from --set\)$"):
        load_params(None, schema_for("03_evaluate"), overrides_origin="--set", shift=0.0)


# the params layer and the math that consumes the knobs; any other module must not re-check them
# (policies/base.py is where classifier-free guidance is computed: the math for guidance_scale)
ALLOWED = {"params.py", "sde.py", "grpo.py", "objectives.py", "policies/base.py"}


def _raised_knobs(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) \
                and getattr(node.exc.func, "id", None) == "ValueError":
            # a range check: the message opens with "<knob>=" and says what it "must be"
            # (contract errors such as "guidance_scale=3 needs cond.uncond" are not range checks)
            text = ast.unparse(node.exc.args[0]) if node.exc.args else ""
            found |= {k for k in KNOB_RULES if text.lstrip("f'\"").startswith(f"{k}=") and "must be" in text}
    return found


def test_no_module_outside_params_and_math_raises_for_a_shared_knob():
    root = Path(__file__).resolve().parents[1] / "grpo_lib"
    offenders = {str(p.relative_to(root)): sorted(k) for p in root.rglob("*.py")
                 if str(p.relative_to(root)) not in ALLOWED and (k := _raised_knobs(p))}
    assert offenders == {}


def test_the_guard_sees_a_reintroduced_copy(tmp_path):
    bad = tmp_path / "copy.py"
    bad.write_text('def f(shift):\n    if shift <= 0:\n        raise ValueError(f"shift={shift} must be > 0")\n'
                   'def g(guidance_scale):\n    raise ValueError(f"guidance_scale={guidance_scale} needs cond.uncond")\n')
    assert _raised_knobs(bad) == {"shift"}
