"""Project-level contracts: the conda env matches pyproject, params load strictly, notebooks are clean."""
import json
import re
import tomllib
from dataclasses import dataclass, field

import pytest
import yaml

from grpo_lib import params as P


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req.strip(), maxsplit=1)[0].lower()


def test_environment_yml_names_pyproject_packages(repo):
    pyproject = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in pyproject["dependencies"]} | {_name(r) for r in pyproject["optional-dependencies"]["dev"]}
    env = yaml.safe_load((repo / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {_name(r) for r in pip_section if not r.startswith("-e")}
    assert listed == wanted
    assert "-e ." in pip_section
    assert "python=3.11" in env["dependencies"]


def test_constraints_pin_cpu_torch(repo):
    assert "torch==2.13.0" in (repo / "constraints.txt").read_text().split()
    assert "-c constraints.txt" in (repo / "Makefile").read_text()


@dataclass
class _Demo:
    run_dir: str = "runs/dev"
    lr: float = 1e-4
    steps: int = 10
    reward: dict[str, float] = field(default_factory=lambda: {"counting_strict": 1.0})
    note: str | None = None


def test_load_params_types_and_unknown_keys(tmp_path):
    p = P.load_params({"lr": 3, "steps": 5}, _Demo)
    assert p.lr == 3.0 and isinstance(p.lr, float) and p.steps == 5
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['stpes'\].*valid keys are: \['lr', 'note', 'reward', 'run_dir', 'steps'\]"):
        P.load_params({"stpes": 5}, _Demo)
    with pytest.raises(ValueError, match=r"steps=2.5 .* expected <class 'int'>"):
        P.load_params({"steps": 2.5}, _Demo)
    with pytest.raises(ValueError, match="reward="):
        P.load_params({"reward": {"counting_strict": "high"}}, _Demo)
    f = tmp_path / "x.yaml"
    f.write_text("lr: 0.5\nnote: hi\n")
    assert P.load_params(f, _Demo, steps=7) == _Demo(lr=0.5, note="hi", steps=7)
    with pytest.raises(ValueError, match="does not exist"):
        P.load_params(tmp_path / "missing.yaml", _Demo)
    with pytest.raises(ValueError, match="no params schema for 'nonsense__x'"):
        P.schema_for("nonsense__x")


NOTEBOOKS = sorted(p.stem for p in (P.__file__ and __import__("pathlib").Path(P.__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_notebook_is_clean_and_its_params_match_schema(repo, notebook):
    path = repo / "notebooks" / f"{notebook}.ipynb"
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [] and cell.get("execution_count") is None, \
                f"{notebook}: commit notebooks without outputs"
    cell_params = P.notebook_parameters(path)
    schema = P.schema_for(notebook)
    import dataclasses
    fields = {f.name for f in dataclasses.fields(schema)}
    assert set(cell_params) == fields, f"{notebook}: parameters cell and {schema.__name__} differ"
    assert "run_dir" in fields
    # every literal in the parameters cell carries a trailing comment
    src = next("".join(c["source"]) for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    for line in src.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            assert "#" in line.split("=", 1)[1], f"{notebook}: parameter line without a comment: {line!r}"
            # papermill cannot parse a parameter line whose comment holds '=' and then silently ignores it
            assert "=" not in line.split("#", 1)[1], f"{notebook}: '=' in a parameter comment: {line!r}"
    # the cell's defaults are the schema's defaults
    assert P.to_dict(P.load_params(cell_params, schema)) == P.to_dict(schema())


PARAM_FILES = sorted((__import__("pathlib").Path(P.__file__).resolve().parents[1] / "params").glob("*.yaml"))


@pytest.mark.parametrize("path", PARAM_FILES, ids=lambda p: p.name)
def test_every_params_file_validates(path):
    P.load_params(path)


# -- issue 14 item 9: params that say what changed ---------------------------------------------------------

def test_base_key_chains_relative_to_the_file_and_names_a_cycle(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text("lr: 0.5\nsteps: 3\nnote: a\n")
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\nsteps: 4\n")
    (tmp_path / "sub" / "c.yaml").write_text("base: b.yaml\nnote: c\n")          # relative to sub/, not the cwd
    assert P.load_params(tmp_path / "sub" / "c.yaml", _Demo) == _Demo(lr=0.5, steps=4, note="c")
    (tmp_path / "x.yaml").write_text("base: y.yaml\nlr: 1.0\n")
    (tmp_path / "y.yaml").write_text("base: x.yaml\n")
    with pytest.raises(ValueError, match=r"params base chain is a cycle: x.yaml -> y.yaml -> x.yaml"):
        P.load_params(tmp_path / "x.yaml", _Demo)
    (tmp_path / "z.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ValueError, match=r"missing.yaml' does not exist \(base chain z.yaml -> missing.yaml\)"):
        P.load_params(tmp_path / "z.yaml", _Demo)
    (tmp_path / "c2").mkdir()
    (tmp_path / "c2" / "bad.yaml").write_text("base: ../a.yaml\nstpes: 1\n")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['stpes'\] in .*c2/bad.yaml"):
        P.load_params(tmp_path / "c2" / "bad.yaml", _Demo)


def test_set_errors_name_set_not_the_yaml(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("lr: 0.5\n")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['stpes'\] in --set for _Demo") as e:
        P.load_params_with_set(f, _Demo, ["stpes=2"])
    assert "x.yaml" not in str(e.value)
    with pytest.raises(ValueError, match=r"parameter steps='many' in --set has type str"):
        P.load_params_with_set(f, _Demo, ["steps=many"])
    # a script's --set reaches this message (train's CLI exits with it)
    from grpo_lib.train import main
    with pytest.raises(ValueError, match=r"\['num_epoch'\] in --set for GRPOParams"):
        main([str(REPO_PARAMS / "02_counting_grpo__smoke.yaml"), "--set", "num_epoch=2"])


def test_exponent_floats_without_a_dot_are_floats_in_files_and_set(tmp_path):
    # YAML 1.1 (PyYAML's default) reads 1e-4 as the string '1e-4'; `--set lr=1e-4` then failed the type check
    f = tmp_path / "x.yaml"
    f.write_text("lr: 2e-3\nsteps: 1000\n")
    assert P.load_params(f, _Demo).lr == pytest.approx(2e-3)
    got = P.load_params_with_set(f, _Demo, ["lr=1e-4", "steps=3"])
    assert (got.lr, got.steps) == (pytest.approx(1e-4), 3) and isinstance(got.steps, int)
    assert P.parse_overrides(["a=-2E+1", "b=1_000", "c=1e4x", "d=1.5e-3"]) == {"a": -20.0, "b": 1000, "c": "1e4x",
                                                                            "d": 1.5e-3}


REPO_PARAMS = __import__("pathlib").Path(P.__file__).resolve().parents[1] / "params"


@pytest.mark.parametrize("name", ["strict_all", "strict_random_50", "partial_first_50", "no_cold_start"])
def test_ablations_hold_their_one_line_difference(name):
    raw = yaml.safe_load((REPO_PARAMS / f"02_counting_grpo__{name}.yaml").read_text())
    assert raw["base"] == "02_counting_grpo__strict_first_50.yaml" and len(raw) == 2, raw
    ablation = P.to_dict(P.load_params(REPO_PARAMS / f"02_counting_grpo__{name}.yaml"))
    default = P.to_dict(P.load_params(REPO_PARAMS / "02_counting_grpo__strict_first_50.yaml"))
    assert len([k for k in default if default[k] != ablation[k]]) == 1


def test_pipeline_stages_name_existing_params_files():
    from grpo_lib.pipeline import STAGES

    for notebook, experiment in STAGES:
        assert experiment is None or (REPO_PARAMS / f"{notebook}__{experiment}.yaml").is_file()


def test_pipeline_use_swaps_a_stage_params_and_names_bad_input():
    from grpo_lib.pipeline import STAGES, stages_with

    swapped = dict(stages_with(["01_cold_start=counts_1_7", "02_counting_grpo=counts_1_7"]))
    assert swapped["01_cold_start"] == swapped["02_counting_grpo"] == "counts_1_7"
    assert [n for n, _ in stages_with([])] == [n for n, _ in STAGES] and stages_with([]) == STAGES
    with pytest.raises(ValueError, match=r"--use '09_x=y': expected NOTEBOOK=EXPERIMENT with NOTEBOOK one of"):
        stages_with(["09_x=y"])
    with pytest.raises(ValueError, match=r"params/01_cold_start__nope.yaml does not exist"):
        stages_with(["01_cold_start=nope"])


def test_a_notebook_refuses_a_base_chain_that_papermill_did_not_follow(capsys):
    from grpo_lib.study import StudyParams

    # papermill -f with a `base:` file injects `base` and none of the base's values
    namespace = P.notebook_parameters(REPO_PARAMS.parent / "notebooks" / "05_sample_efficiency.ipynb")
    assert P.params_in_notebook(namespace, StudyParams) == StudyParams(**namespace)
    namespace["base"] = "05_sample_efficiency__study4.yaml"
    with pytest.raises(ValueError, match=r"papermill passed base='05_sample_efficiency__study4.yaml'.*"
                                         r"python -m grpo_lib.params"):
        P.params_in_notebook(namespace, StudyParams)
    # the resolved file carries the base's values, and loads back to the same params
    assert P.main([str(REPO_PARAMS / "05_sample_efficiency__study5.yaml")]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert "base" not in resolved and resolved["train_params"] == "params/02_counting_grpo__strict_first_50.yaml"
    assert P.load_params(resolved, StudyParams) == P.load_params(REPO_PARAMS / "05_sample_efficiency__study5.yaml")
