"""Notebook 05's widget in a real browser (``make test-browser``; not part of ``pytest tests/``: run it by path).

JupyterLab runs headless on a copy of ``notebooks/`` (the notebooks in the repository are never touched); Debian's ``chromium``
and ``chromium-driver`` (``$CHROMIUM``, ``$CHROMEDRIVER``; nothing downloads a browser or a driver) open notebook 05:

1. opening it does not mark it modified (kernel name, nbformat and cell ids as JupyterLab writes them);
2. "Run All Cells" runs it without an error output;
3. the widget shows the original and the edited images (each tile >= 64 px) and sliders with a >= 300 px track;
4. moving the first strength slider, then toggling the first checkbox, each changes the edited image and the readout,
   and neither leaves an error or a "rendering" readout behind.

Before it touches a control it saves a screenshot of the widget as JupyterLab draws it (controls and images, cropped,
palette PNG of < 300 KB) to ``docs/widget_05.png`` (``$SEPME_SCREENSHOT`` overrides the path; empty: no file): the
picture notebook 05 and the README show to readers who do not run the notebook. This is the one file it writes.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image, ImageChops

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = "05_interactive_combination.ipynb"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
TOKEN = "sepme-browser-test"
RUN_TIMEOUT = int(os.environ.get("SEPME_BROWSER_TIMEOUT", "900"))  # seconds for "Run All Cells"
SCREENSHOT = os.environ.get("SEPME_SCREENSHOT", str(ROOT / "docs" / "widget_05.png"))
MAX_SCREENSHOT_BYTES = 300_000

if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install -y chromium chromium-driver)",
                allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A headless JupyterLab on a copy of the notebooks, in the ci profile, with no network features."""
    work = tmp_path_factory.mktemp("lab")
    shutil.copytree(ROOT / "notebooks", work / "notebooks")
    settings = work / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false",
                                                                           "checkForUpdates": False}))
    port = _free_port()
    env = dict(os.environ, PROFILE="ci", MODEL="tiny", SEPME_DEVICE="cpu", JUPYTERLAB_SETTINGS_DIR=str(work / "settings"),
               JUPYTER_CONFIG_DIR=str(work / "config"), JUPYTER_RUNTIME_DIR=str(work / "runtime"))
    env.pop("SEPME_CLIP", None)
    log = open(work / "lab.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                             f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={work}",
                             "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                             "--LabApp.extension_manager=readonly"] + (["--allow-root"] if os.geteuid() == 0 else []),
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() - t0 > 120:
                proc.kill()
                pytest.fail(f"JupyterLab did not start:\n{(work / 'lab.log').read_text()[-3000:]}")
            time.sleep(0.5)
    print(f"\nJupyterLab up in {time.time() - t0:.1f} s")
    yield url, work
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1100",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def _wait(driver, what, timeout=60, every=0.25):
    return WebDriverWait(driver, timeout, poll_frequency=every, ignored_exceptions=(StaleElementReferenceException,)
                         ).until(lambda d: what(d))


def _kernel_idle(driver) -> bool:
    ind = driver.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook-ExecutionIndicator")
    return bool(ind) and ind[0].get_attribute("data-status") == "idle"


def _busy_prompts(driver) -> int:
    return sum("*" in p.text for p in driver.find_elements(By.CSS_SELECTOR, ".jp-InputPrompt"))


def _dirty(driver) -> bool:
    return bool(driver.find_elements(By.CSS_SELECTOR, ".lm-TabBar-tab.jp-mod-dirty"))


def _errors(driver) -> list[str]:
    outs = driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    return [o.text[:500] for o in outs if "Traceback" in o.text or "Error" in o.text.split("\n")[-1]]


def _menu(driver, menu: str, item: str) -> None:
    driver.find_element(By.XPATH, f"//div[contains(@class,'lm-MenuBar-itemLabel') and text()='{menu}']").click()
    _wait(driver, lambda d: d.find_element(
        By.XPATH, f"//li[contains(@class,'lm-Menu-item')]//div[contains(@class,'lm-Menu-itemLabel') and text()='{item}']"),
        10).click()


def _state(widget) -> tuple[str, str]:
    """(src of the edited image, readout text)."""
    imgs = widget.find_elements(By.CSS_SELECTOR, "img")
    pres = widget.find_elements(By.CSS_SELECTOR, "pre")
    return imgs[-1].get_attribute("src"), pres[-1].text


def save_screenshot(png: bytes, path: str | Path, pad: int = 8) -> int:
    """Crop a screenshot to what is drawn on it (plus ``pad`` px), store it as a palette PNG; returns its size in bytes."""
    import io
    img = Image.open(io.BytesIO(png)).convert("RGB")
    box = ImageChops.difference(img, Image.new("RGB", img.size, "white")).getbbox() or (0, 0, *img.size)
    img = img.crop((max(box[0] - pad, 0), max(box[1] - pad, 0), min(box[2] + pad, img.width), min(box[3] + pad, img.height)))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return Path(path).stat().st_size


def _scroll_into_panel(driver, el, tries: int = 20) -> bool:
    """Scroll ``el`` to the top of the notebook's scrolling panel until it lies wholly inside it (outputs above it that
    finish loading push it down again: retried until it stays)."""
    inside_js = """const r = arguments[0].getBoundingClientRect();
        let p = arguments[0].parentElement;
        while (p && !(p.scrollHeight > p.clientHeight && /auto|scroll/.test(getComputedStyle(p).overflowY))) {
            p = p.parentElement; }
        const c = p ? p.getBoundingClientRect() : {top: 0, bottom: window.innerHeight};
        return r.height > 0 && r.top >= c.top - 1 && r.bottom <= c.bottom + 1;"""
    for _ in range(tries):
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", el)
        time.sleep(1.0)
        if driver.execute_script(inside_js, el):
            return True
    return False


def _settled_change(driver, widget, before, timeout=120):
    """Wait until both the edited image and the readout differ from ``before`` and the readout is final."""
    def done(_):
        src, text = _state(widget)
        return (src, text) if src != before[0] and text != before[1] and "rendering" not in text else False
    return _wait(driver, done, timeout)


def test_notebook_05_runs_and_its_widget_answers(lab, browser):
    url, work = lab
    t0 = time.time()
    browser.get(f"{url}/lab/tree/notebooks/{NOTEBOOK}?token={TOKEN}")
    _wait(browser, _kernel_idle, 120)
    time.sleep(2)  # let JupyterLab apply the kernel's language info to the model
    assert not _dirty(browser), "opening the notebook marked it modified (kernelspec / nbformat / ids)"
    print(f"notebook open, kernel idle, not modified: {time.time() - t0:.1f} s")

    t1 = time.time()
    _menu(browser, "Run", "Run All Cells")
    _wait(browser, lambda d: _busy_prompts(d) > 0, 30)
    _wait(browser, lambda d: _busy_prompts(d) == 0 and _kernel_idle(d), RUN_TIMEOUT, every=1)
    print(f"Run All Cells: {time.time() - t1:.1f} s")
    assert not _errors(browser), _errors(browser)

    widget = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, ".sepme-combination-widget"), 30)
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'});", widget)
    imgs = widget.find_elements(By.CSS_SELECTOR, "img")
    assert len(imgs) == 2, f"expected the original and the edited images, found {len(imgs)}"
    for img in imgs:  # 2 x 2 tiles of >= 64 px each, visible without opening anything
        assert img.is_displayed() and img.size["width"] >= 2 * 64 and img.size["height"] >= 2 * 64, img.size
    tracks = widget.find_elements(By.CSS_SELECTOR, ".widget-slider .slider-container")
    assert tracks and min(t.size["width"] for t in tracks) >= 300, [t.size["width"] for t in tracks]
    before = _state(widget)
    assert "ACC" in before[1] and "leakage" in before[1], before[1]
    if SCREENSHOT:  # the widget as it opened (every increment on), for readers who do not run the notebook
        _wait(browser, lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i)
                                     for i in imgs), 30)
        assert _scroll_into_panel(browser, widget), "the widget does not fit in the notebook panel: no screenshot"
        size = save_screenshot(widget.screenshot_as_png, SCREENSHOT)
        print(f"screenshot of the widget: {SCREENSHOT} ({size / 1e3:.0f} kB)")
        assert size < MAX_SCREENSHOT_BYTES, f"{SCREENSHOT} is {size / 1e3:.0f} kB (> {MAX_SCREENSHOT_BYTES / 1e3:.0f} kB)"

    t2 = time.time()  # move the first strength slider (a drag: one change event)
    handle = widget.find_elements(By.CSS_SELECTOR, ".noUi-handle")[0]
    ActionChains(browser).click_and_hold(handle).move_by_offset(-80, 0).release().perform()
    after_slider = _settled_change(browser, widget, before)
    assert after_slider[1].splitlines()[0] != before[1].splitlines()[0], after_slider[1]  # a new strength s_1
    print(f"slider moved -> new image and readout in {time.time() - t2:.1f} s:\n{after_slider[1]}")

    t3 = time.time()  # switch the first increment off
    widget.find_elements(By.CSS_SELECTOR, "input[type=checkbox]")[0].click()
    after_box = _settled_change(browser, widget, after_slider)
    print(f"checkbox toggled -> new image and readout in {time.time() - t3:.1f} s:\n{after_box[1]}")
    assert "could not render" not in after_box[1] and not _errors(browser)
    assert widget.find_elements(By.CSS_SELECTOR, "input[type=checkbox]")[0].is_selected() is False
