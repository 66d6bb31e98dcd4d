"""The saliency run's index.html in a real headless Chromium: one row per case, every thumbnail loaded,
every link pointing at a file of the output folder. Skipped where no Chromium, chromedriver or selenium
is installed (CI installs them: .ci/run)."""
import io
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import matplotlib.pyplot as plt
import numpy as np
import pytest

from scripts.inference import json_path, mask_path, report_path, saliency_path
from scripts.saliency.index import index_row, write_index
from scripts.saliency.report import write_report

TASKS = ("1p19q", "idh", "grade")
CLASS_NAMES = {"1p19q": ["intact", "codeleted"], "idh": ["wildtype", "mutant"], "grade": ["LGG", "HGG"]}


def _browser() -> tuple[str, str]:
    """(chromium binary, chromedriver), or skip naming what is missing."""
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[test]')")
    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("no Chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
    return binary, driver


def _output_folder(out: Path, case_ids: list[str]) -> None:
    """What a saliency run leaves for `case_ids`: reports (real PNGs), maps, masks, JSON, index.html."""
    rng = np.random.default_rng(0)
    rows = []
    for case_id in case_ids:
        case = {"case_id": case_id}
        image = rng.normal(size=(2, 16, 16, 16)).astype(np.float32)
        mask = np.zeros((16, 16, 16), np.uint8)
        mask[5:9, 6:10, 7:11] = 1
        maps = {t: rng.uniform(size=(16, 16, 16)) for t in TASKS}
        probs = {t: [0.3, 0.7] for t in TASKS}
        write_report(report_path(out, case), image, mask, maps, probs, CLASS_NAMES, title=case_id)
        for path in [json_path(out, case), mask_path(out, case), *[saliency_path(out, case, t) for t in TASKS]]:
            path.write_bytes(b"x")
        files = [(json_path("", case).name, "JSON"), (mask_path("", case).name, "mask")]
        files += [(saliency_path("", case, t).name, t) for t in TASKS]
        result = {t: {"probabilities": probs[t], "class": 1, "class_name": CLASS_NAMES[t][1]} for t in TASKS}
        rows.append(index_row(case_id, report_path("", case).name, result, files))
    write_index(out / "index.html", rows)


def test_index_page_in_headless_chromium(tmp_path):
    binary, driver_path = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    case_ids = ["P1", "site/P2", "100% sure <b>"]  # '/', '%' and markup in ids: escaped names, escaped URLs
    _output_folder(tmp_path, case_ids)
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1200"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        driver.get((tmp_path / "index.html").as_uri())
        rows = driver.find_elements("css selector", "tr.case")
        assert [r.get_attribute("data-case-id") for r in rows] == case_ids
        widths = driver.execute_script(
            "return Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0);")
        assert len(widths) == len(case_ids) and all(w > 0 for w in widths), widths
        links = driver.execute_script("return Array.from(document.links).map(a => a.href);")
        assert len(links) == len(case_ids) * (1 + 2 + len(TASKS))
        for link in links:
            url = urlparse(link)
            target = Path(unquote(url.path))
            assert url.scheme == "file" and target.parent == tmp_path and target.is_file(), link
        png = driver.get_screenshot_as_png()
    finally:
        driver.quit()
    shot = plt.imread(io.BytesIO(png), format="png")
    assert shot.shape[0] > 100 and float(shot[..., :3].std()) > 0.05  # a rendered page, not a blank one
