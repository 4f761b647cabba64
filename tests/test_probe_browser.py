"""The probe page as a person uses it: Debian's chromium driven by selenium (chromium-driver) opens
probe.html offline, moves to a pixel with the mouse and to another with the arrow keys, and the field
values on display (and the colours on the canvases) are checked against probe.json and probe.npz.

In CI (CI=true) a missing chromium, chromedriver or selenium fails the test; elsewhere it is skipped
(``make system-deps`` installs chromium and chromium-driver, the ``test`` extra selenium)."""

import json
import os
import shutil

import numpy as np
import pytest

from localdiff import load_dataset
from localdiff import probe
from localdiff.probing.explorer import colour


def _need(what: str, fix: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} is not installed, and CI=true: {fix}")
    pytest.skip(f"{what} is not installed ({fix})")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """Two 16 px sets of the same shape and a colour 8 px set (another shape: its pixel follows by position)."""
    out = tmp_path_factory.mktemp("probe-page")
    cache = out / "cache"
    sets = {"grf": load_dataset("grf", num=1500), "grf-aniso": load_dataset("grf-aniso", num=1500),
            "patches": load_dataset("natural-patches", resolution=8, num=1500)}
    held = {"grf": load_dataset("grf", split="test", num=200), "grf-aniso": load_dataset("grf-aniso", split="test", num=200),
            "patches": load_dataset("natural-patches", split="test", resolution=8, num=200)}
    res = probe(*sets.values(), labels=list(sets), held_out=held, held_out_num=12, cache=str(cache), progress=False)
    res.write(out, save_fields=True)
    return out, json.loads((out / "probe.json").read_text()), np.load(out / "probe.npz")


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _need("selenium", "pip install selenium (the test extra)")
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        _need("chromium", "apt-get install chromium (make system-deps)")
    drv = shutil.which("chromedriver")
    if drv is None:
        _need("chromedriver", "apt-get install chromium-driver (make system-deps)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = exe
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1400,1600",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(executable_path=drv), options=opts)
    yield d
    d.quit()


def _displayed(drv, label: str):
    """Per level: (pixel, values [H*W], panel max, colour-bar scale) of the field canvases of one row."""
    out = []
    for cv in drv.find_elements("css selector", f"canvas.ex-field[data-model='{label}']"):
        out.append((tuple(int(v) for v in cv.get_attribute("data-pixel").split(",")),
                    np.asarray([float(v) for v in cv.get_attribute("data-values").split()]),
                    float(cv.get_attribute("data-max")), float(cv.get_attribute("data-scale")), cv))
    return out


def _check_row(drv, rec: dict, arrays, label: str, pixel: tuple[int, int], *, from_json: bool):
    d = rec["datasets"][label]
    _, h, w = d["shape"]
    shown = _displayed(drv, label)
    assert len(shown) == len(rec["levels"])
    if from_json:
        k = [tuple(p) for p in d["sample_fields"]["pixels"]].index(pixel)
    for ti, (pix, values, peak, scale, canvas) in enumerate(shown):
        assert pix == pixel
        t = str(rec["levels"][ti]["t"])
        exact = (np.asarray(d["sample_fields"]["fields"][t][k], dtype=np.float64).ravel() if from_json
                 else arrays[f"{label}/fields"][ti, pixel[0] * w + pixel[1]].astype(np.float64))
        assert values.shape == (h * w,)
        assert peak == pytest.approx(np.abs(exact).max(), rel=1e-5)
        # int8 with s = max|F| / 127: every value within s / 2 (plus float32 and 7-digit rounding)
        assert np.abs(values - exact).max() <= peak / 254 * (1 + 1e-4) + 1e-7 * peak
        assert np.abs(values - exact).max() > 0 or np.count_nonzero(exact) <= 1  # it is the quantised copy
        # the canvas shows the colour of the largest value (at the panel's own scale)
        i = int(np.argmax(np.abs(values)))
        rgb = drv.execute_script("var d = arguments[0].getContext('2d').getImageData(arguments[1], arguments[2], 1, 1)"
                                 ".data; return [d[0], d[1], d[2]];", canvas, i % w, i // w)
        assert tuple(rgb) == colour(values[i] / scale)


def test_explorer_shows_the_json_fields_at_two_pixels(page, driver):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    out, rec, arrays = page
    driver.get((out / "probe.html").resolve().as_uri())
    WebDriverWait(driver, 60).until(lambda d: d.find_element("id", "probe-explorer").get_attribute("data-state") != "loading")
    root = driver.find_element("id", "probe-explorer")
    assert root.get_attribute("data-state") == "ready"
    assert driver.find_element("tag name", "html").get_attribute("data-image-check") == "ok"
    first, second = [tuple(p) for p in rec["datasets"]["grf"]["sample_fields"]["pixels"][1:3]]  # (4, 4), (12, 12)

    # the mouse: click the pixel on the first set's mean image
    mean = driver.find_element("css selector", "canvas.ex-mean[data-model='grf']")
    size = mean.size
    ActionChains(driver).move_to_element_with_offset(
        mean, int((first[1] + 0.5) * size["width"] / 16 - size["width"] / 2),
        int((first[0] + 0.5) * size["height"] / 16 - size["height"] / 2)).click().perform()
    assert root.get_attribute("data-pixel") == f"{first[0]},{first[1]}"
    for label in ("grf", "grf-aniso"):
        _check_row(driver, rec, arrays, label, first, from_json=True)
    _check_row(driver, rec, arrays, "patches", (first[0] // 2, first[1] // 2), from_json=False)  # 8 px: same place

    # the keyboard: arrows move the held pixel to the second one
    keys = [Keys.ARROW_DOWN] * (second[0] - first[0]) + [Keys.ARROW_RIGHT] * (second[1] - first[1])
    root.send_keys(*keys)
    assert root.get_attribute("data-pixel") == f"{second[0]},{second[1]}"
    for label in ("grf", "grf-aniso"):
        _check_row(driver, rec, arrays, label, second, from_json=True)
    _check_row(driver, rec, arrays, "patches", (second[0] // 2, second[1] // 2), from_json=False)

    # masks on display are the probe's: their sizes are the JSON's map at that pixel
    for mv, ti in zip(driver.find_elements("css selector", "canvas.ex-mask[data-model='grf']"), range(len(rec["levels"]))):
        assert int(mv.get_attribute("data-size")) == rec["datasets"]["grf"]["maps"]["mask_size"][ti][second[0]][second[1]]
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []


def test_a_corrupt_payload_is_reported_not_silent(page, driver, tmp_path):
    """The check above must be able to fail: a page whose field data do not inflate says so."""
    out, _, _ = page
    html = (out / "probe.html").read_text()
    start = html.index('"fields":"') + len('"fields":"')
    broken = html[:start] + "AAAA" + html[start + 4:]
    (tmp_path / "broken.html").write_text(broken)
    driver.get((tmp_path / "broken.html").resolve().as_uri())
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 60).until(lambda d: d.find_element("id", "probe-explorer").get_attribute("data-state") != "loading")
    assert driver.find_element("id", "probe-explorer").get_attribute("data-state") == "error"
    assert any("localdiff explorer" in e["message"] for e in driver.get_log("browser"))
