"""The annotation page in a real headless browser: Chromium (Debian's ``chromium`` + ``chromium-driver``)
driven by Selenium. Sign in, annotate three steps and one fact with the keyboard only, see them in the store.

Skips, saying why, where Selenium, Chromium or chromedriver is missing (``make test`` installs Selenium;
``apt-get install chromium chromium-driver`` provides the browser). ``SHE_ANNOTATION_SCREENSHOT=path.png``
also saves a screenshot of the page (docs/img/annotation.png is made this way).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install 'she[test]')")


def _which(env: str, names: tuple[str, ...]) -> str | None:
    if os.environ.get(env):
        return os.environ[env]
    return next((p for p in map(shutil.which, names) if p), None)


CHROMIUM = _which("SHE_CHROMIUM", ("chromium", "chromium-browser", "google-chrome"))
DRIVER = _which("SHE_CHROMEDRIVER", ("chromedriver",))
pytestmark = pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                                reason=f"no headless browser: chromium {CHROMIUM or 'missing'}, chromedriver "
                                       f"{DRIVER or 'missing'} (apt-get install chromium chromium-driver)")

from she.annotation.app import create_app, prepare  # noqa: E402
from she.data.annotations import AnnotationStore  # noqa: E402
from she.data.factstore import FactStore  # noqa: E402
from she.data.loaders import save_jsonl  # noqa: E402
from she.data.schema import Product, Record, StepFacts  # noqa: E402

TOKEN = "alice-token-0123456789"
TRACE = ("Query: dewalt drill; brand=DeWalt\nProduct: drill; brand=DeWalt; size=20V\nType: same\n"
         "Attributes: brand=match\nVerdict: Exact")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    import uvicorn

    rec = Record(id="r1", query="dewalt drill", label="Exact",
                 product=Product(title="DeWalt 20V MAX Cordless Drill <b>bold?</b>", brand="DeWalt",
                                 description="Compact drill/driver kit, 2 batteries.", attributes={"size": "20V"}))
    save_jsonl([rec], tmp_path / "data.jsonl")
    (tmp_path / "traces.jsonl").write_text(json.dumps({"id": "r1", "trace": TRACE}) + "\n")
    prepare(str(tmp_path / "data.jsonl"), str(tmp_path / "facts.sqlite"), traces=str(tmp_path / "traces.jsonl"),
            qc_share=0.0)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(tmp_path / "facts.sqlite", {"alice": TOKEN}), host="127.0.0.1",
                                        port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", tmp_path / "facts.sqlite"
    srv.should_exit = True
    th.join(10)


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,800"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    yield drv
    drv.quit()


def test_keyboard_annotation_lands_in_the_store(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, store_path = server
    browser.get(url + "/")
    assert "Sign in" in browser.page_source  # 401 page with the sign-in form
    browser.find_element(By.ID, "token").send_keys(TOKEN + Keys.ENTER)
    WebDriverWait(browser, 20).until(lambda d: "/item/" in d.current_url)
    assert "<b>bold?</b>" in browser.find_element(By.ID, "title").text  # shown as text, not markup
    assert not browser.find_elements(By.CSS_SELECTOR, "#title b")
    body = browser.find_element(By.TAG_NAME, "body")
    n_saved = [0]

    def keys(*ks):
        for k in ks:
            body.send_keys(k)

    def saved():
        n_saved[0] += 1
        WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "msg").text.startswith("saved"))
        browser.execute_script("document.getElementById('msg').textContent = ''")

    # rows: 0 Query step, 1 negation fact, 2 Product step, 3 Type step, 4 type_relation fact, 5 Attributes ...
    keys("r")
    saved()  # Query: right
    keys("j", "j", "w")
    saved()  # Product: wrong
    keys("j", Keys.ARROW_DOWN, Keys.ARROW_UP, "r")
    saved()  # Type: right (and its fact)
    keys("j", "2")
    saved()  # type_relation = related (the 2nd value): a correction of the fact the right mark set
    status = browser.find_element(By.CSS_SELECTOR, '[data-target="fact:type_relation"] .status').text
    assert "related" in status and "corrected, was same" in status
    assert browser.find_element(By.ID, "mine").text == "0 done, 5 answers"  # 3 marks, 1 implied fact, 1 fact
    assert "0 / 1 items complete" in browser.find_element(By.TAG_NAME, "header").text
    if os.environ.get("SHE_ANNOTATION_SCREENSHOT"):
        browser.save_screenshot(os.environ["SHE_ANNOTATION_SCREENSHOT"])
    st = AnnotationStore(store_path)
    marks = {a.target: a.value for a in st.answers() if a.target.startswith("step:")}
    assert marks == {"step:0": "right", "step:1": "wrong", "step:2": "right"}
    assert all(a.annotator == "alice" for a in st.answers())
    assert FactStore.open(store_path).get("r1") == StepFacts(type_relation="related")
    keys("n")  # finish: the queue is empty now
    WebDriverWait(browser, 20).until(lambda d: "Nothing left" in d.page_source)
    assert st.progress()["complete"] == 1
