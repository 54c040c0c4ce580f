"""The inference preview in a real browser: JupyterLab on 127.0.0.1, headless Debian Chromium driven by Playwright.

A temp copy of notebooks/04_inference_preview.ipynb (the smoke parameters injected by papermill, ``generate`` off,
``run_dir`` in the temp dir) is opened in JupyterLab, run with Run -> Run All Cells, the prompt and seed are typed
into the widget, Generate is clicked, and the grid must come back from the kernel: an <img> with the grid PNG inside
the widget's output, the status line with the detector's counts, and the same counts in run_dir/preview/results.json.
A full-page screenshot goes to runs/browser/inference_preview.png.

Nothing is downloaded: the browser is /usr/bin/chromium (``playwright install`` is never run), with the background
networking of Chromium switched off; JupyterLab's config, settings, workspaces and runtime files live in the temp dir,
and the committed notebook is never opened, so the test leaves only the screenshot behind.
"""
from __future__ import annotations

import base64
import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
NOTEBOOK = "04_inference_preview"
SCREENSHOT = REPO / "runs" / "browser" / "inference_preview.png"
PROMPT = "a photo of two green triangles"      # typed into the widget (the smoke params say three blue squares)
SEED = 5                                        # typed into the widget (the smoke params say 0)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync"]

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 40) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else ["(no log)"]
    return "\n".join(lines[-n:])


def _stop(proc: subprocess.Popen, url: str, token: str) -> None:
    """Shut the server down through its API (it stops its kernels), then make sure the server and every
    process it started (kernels run in their own session, so a process-group kill would miss them) are gone."""
    import psutil

    try:
        family = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    try:
        req = urllib.request.Request(f"{url}api/shutdown?token={token}", method="POST", data=b"")
        urllib.request.urlopen(req, timeout=5).close()
        proc.wait(timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(family, timeout=10)
    for p in alive:
        p.kill()
    psutil.wait_procs(alive, timeout=5)


@pytest.fixture
def jupyter_lab(tmp_path):
    """(server process, url, token, notebook path relative to the server root, run_dir, log): a JupyterLab
    server on a free loopback port whose root is a temp dir holding the parameterised notebook copy."""
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    root, home = tmp_path / "root", tmp_path / "home"
    root.mkdir()
    run_dir = tmp_path / "run"
    params = _smoke_params()
    # the browser clicks Generate, not the notebook; an empty runs_root lists only the shipped base
    params.update(run_dir=str(run_dir), runs_root=str(tmp_path / "runs"), generate=False)
    nb = parameterize_notebook(load_notebook_node(str(REPO / "notebooks" / f"{NOTEBOOK}.ipynb")), params)
    nbformat.write(nb, root / f"{NOTEBOOK}.ipynb")

    # no news / update checks (they would reach for the network), no popups over the notebook
    settings = home / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    # every cell in the DOM (the default windowing attaches off-screen cells late, or not at all)
    tracker = home / "settings" / "@jupyterlab" / "notebook-extension"
    tracker.mkdir(parents=True)
    (tracker / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    (home / "config").mkdir()
    (home / "config" / "jupyter_server_config.json").write_text(json.dumps({
        "ServerApp": {"allow_root": os.geteuid() == 0, "terminals_enabled": False},
        "LabApp": {"news_url": None, "extension_manager": "readonly",
                   "check_for_updates_class": "jupyterlab.handlers.announcements.NeverCheckForUpdate"}}))
    # config, data (kernelspecs of the user, the notebook trust db), runtime, settings, workspaces: all temp
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_DATA_DIR=str(home / "data"),
               JUPYTER_RUNTIME_DIR=str(home / "runtime"),
               JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"), JUPYTERLAB_SETTINGS_DIR=str(home / "settings"),
               IPYTHONDIR=str(home / "ipython"), MPLBACKEND="Agg", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    port, token = _free_port(), secrets.token_hex(16)
    url = f"http://127.0.0.1:{port}/"
    log = tmp_path / "jupyter.log"
    with open(log, "wb") as out:
        # python3 resolves to this interpreter (jupyter_client swaps a kernelspec's "python" for sys.executable)
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
             "--port-retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
             "--MappingKernelManager.default_kernel_name=python3"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                why = f"exited with {proc.returncode}" if proc.poll() is not None else "not ready after 60 s"
                pytest.fail(f"JupyterLab {why} ({url}); server log tail:\n{_tail(log)}")
            time.sleep(0.5)
        yield proc, url, token, f"{NOTEBOOK}.ipynb", run_dir, log
    finally:
        _stop(proc, url, token)


def _smoke_params() -> dict:
    import yaml

    p = yaml.safe_load((REPO / "params" / f"{NOTEBOOK}__smoke.yaml").read_text())
    assert p["noise_level"] == 0 and p["checkpoint"] == "data/checkpoints/tiny-base", p    # what the test expects
    return p


def _expected_counts(p: dict) -> list[int]:
    """ShapeCounter counts of the base's ODE images for PROMPT, image k from seed SEED + k, with the smoke
    parameters p (images, steps, guidance; shift 1 as in PreviewParams): what the kernel must have drawn."""
    import torch

    from grpo_lib.policies.tiny import TinyPolicy
    from grpo_lib.rewards.detector import ShapeCounter
    from grpo_lib.rollout import sample_images

    policy = TinyPolicy.from_pretrained(REPO / "data" / "checkpoints" / "tiny-base")
    n = p["num_images"]
    gens = [torch.Generator().manual_seed(SEED + k) for k in range(n)]
    images = sample_images(policy, [PROMPT] * n, num_steps=p["num_steps"], shift=1.0,
                           guidance_scale=p["guidance_scale"], generator=gens)[1]
    return ShapeCounter().count(images, ["green triangle"] * n, [2] * n).tolist()


def _page_state(page) -> str:
    """What the notebook shows (kernel status, prompts, error outputs): the message when a wait times out."""
    try:
        return page.evaluate("""() => {
            const t = sel => [...document.querySelectorAll(sel)].map(e => e.innerText.trim()).filter(Boolean);
            return ['kernel: ' + t('.jp-StatusBar-TextItem').filter(s => s.includes('Python')).join(' '),
                    'prompts: ' + t('.jp-InputArea-prompt').join(' '),
                    'errors/stderr: ' + t('.jp-OutputArea-output[data-mime-type*="error"], '
                                          + '.jp-OutputArea-output[data-mime-type*="stderr"]').join('\\n')
                   ].join('\\n');
        }""")
    except Exception as e:                                  # the page itself is gone
        return f"(page state unavailable: {e})"


@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"{CHROMIUM} not installed (apt-get install chromium)")
def test_inference_preview_generates_a_grid_in_headless_chromium(jupyter_lab, tmp_path, one_thread):
    import psutil
    from PIL import Image
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect, sync_playwright

    proc, url, token, nb_path, run_dir, log = jupyter_lab
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    step = "start Chromium"
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 1000},
            env=dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "xdg-config"), XDG_CACHE_HOME=str(tmp_path / "xdg-cache")))
        page = ctx.pages[0] if ctx.pages else ctx.new_page()
        try:
            step = "open the notebook and wait for its kernel to be idle"
            page.goto(f"{url}lab/tree/{nb_path}?token={token}", wait_until="domcontentloaded", timeout=60_000)
            expect(page.locator(".jp-StatusBar-TextItem", has_text="Python 3 (ipykernel) | Idle")).to_be_visible(
                timeout=60_000)
            page.locator(".jp-Notebook .jp-Cell").first.click()      # the notebook is the active panel
            step = "Run -> Run All Cells"
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click()

            step = "wait for the widget (the notebook's cells run in the kernel)"
            widget = page.locator(".widget-vbox").filter(has=page.locator("button", has_text="Generate"))
            button = widget.locator("button", has_text="Generate")
            button.wait_for(timeout=60_000)
            step = "type the prompt and the seed, click Generate"
            widget.locator(".widget-text", has_text="prompt").locator("input").fill(PROMPT)
            seed = widget.locator(".widget-text", has_text="seed").locator("input")
            seed.fill(str(SEED))
            seed.press("Enter")                    # IntText sends its value on Enter / blur
            button.click()
            step = "wait for the grid in the widget's output"
            grid = widget.locator(".widget-output img")
            grid.first.wait_for(timeout=60_000)
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=grid.first.element_handle(),
                                   timeout=10_000)
            kernels = [p.cmdline() for p in psutil.Process(proc.pid).children(recursive=True)
                       if "ipykernel_launcher" in p.cmdline()]
            step = "wait for the status line"
            status = widget.locator(".widget-html")
            expect(status).to_contain_text("target 2 green triangle -> ", timeout=10_000)
            grid.last.scroll_into_view_if_needed()
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            shown = grid.evaluate_all("imgs => imgs.map(i => [i.src, i.naturalWidth, i.naturalHeight])")
            status_text = status.inner_text()
        except (PlaywrightError, AssertionError) as e:
            shot = SCREENSHOT.with_name("failure.png")
            page.screenshot(path=str(shot), full_page=True)
            failure = (f"in the browser, step '{step}' failed: {str(e).splitlines()[0]}\n{_page_state(page)[-4000:]}"
                       f"\nscreenshot: {shot}\nserver log tail:\n{_tail(log, 15)}")
        else:
            failure = ""
        finally:
            ctx.close()
    if failure:
        pytest.fail(failure, pytrace=False)

    # the notebook's "python3" kernel is this interpreter (the venv), one kernel
    assert [k[0] for k in kernels] == [sys.executable], kernels
    SCREENSHOT.with_name("failure.png").unlink(missing_ok=True)
    # the kernel received what was typed in the browser, and saved what it drew
    saved = json.loads((run_dir / "preview" / "results.json").read_text())
    assert (saved["prompt"], saved["seed"]) == (PROMPT, SEED), saved
    assert saved["target"] == {"class": "green triangle", "count": 2}
    found = saved["grids"]["data/checkpoints/tiny-base"]["found"]
    p = _smoke_params()
    assert found == _expected_counts(p), found              # the seeds as typed; the detector's counts
    exact = sum(f == 2 for f in found)
    assert status_text.startswith(f"target 2 green triangle -> data/checkpoints/tiny-base: found {found}, "
                                  f"{exact}/{p['num_images']} exact ("), status_text
    # one grid, and it is exactly the PNG the kernel drew (base64 in the <img>), decoded at its full size
    assert len(shown) == 1, f"expected one grid image in the widget output, got {len(shown)}"
    src, width, height = shown[0]
    png = (run_dir / "preview" / "grid_A.png").read_bytes()
    assert src == "data:image/png;base64," + base64.b64encode(png).decode()
    assert (width, height) == Image.open(io.BytesIO(png)).size, (width, height)
    assert width >= p["num_images"] * 128 and height >= 128, (width, height)    # 32 px cells drawn at >= 128 px
    assert SCREENSHOT.stat().st_size > 10_000
