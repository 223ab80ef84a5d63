"""Drive the demo page in a real headless Chromium (Debian's chromium + chromedriver through selenium):
start `demo.py` on a free port, upload, type, press, wait for results, read images and files back.
Used by benchmarks/demo_latency.py and the demo's browser test (tests/test_demo_browser.py)."""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

from PIL import Image

from genloc.files import save_image

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def demo_server(args: list[str], startup_timeout: float = 300.0):
    """`python demo.py ARGS --port P` on 127.0.0.1; yields its URL once it answers, ends it afterwards.
    Its output goes to a log file whose tail is in the error if it fails to start."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "GRADIO_ANALYTICS_ENABLED": "False"}
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"genloc-demo-{port}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "demo.py", *args, "--port", str(port)], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"demo.py exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"demo.py did not answer within {startup_timeout:.0f} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_path.unlink(missing_ok=True)


def chromium(width: int = 1400, height: int = 1800):
    """Headless Debian Chromium through its own chromedriver (nothing is downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not browser or not driver:
        raise RuntimeError("chromium and chromedriver are needed: apt-get install -y chromium chromium-driver "
                           "(`make browser` installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def wait_for(driver, script: str, timeout: float, *args, poll: float = 0.01):
    """Poll the JavaScript ``script`` (which returns a value or null) until it gives a value."""
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script(script, *args)
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"page condition not met within {timeout} s: {script[:120]}")
        time.sleep(poll)


IMAGE_SRC = """const img = document.querySelector(arguments[0] + ' img');
return img && img.src !== arguments[1] && img.complete && img.naturalWidth > 0 ? img.src : null;"""
# A new image in arguments[0] (src other than arguments[1]), or a new error message (not arguments[2]).
RESULT = """const img = document.querySelector(arguments[0] + ' img');
if (img && img.src !== arguments[1] && img.complete && img.naturalWidth > 0) return 'image';
const m = document.querySelector('#message [data-testid=markdown]');
const t = m ? m.innerText.trim() : '';
return t !== arguments[2] && t.includes('Error') ? 'error' : null;"""


def image_src(driver, elem_id: str) -> str | None:
    return driver.execute_script("const i = document.querySelector(arguments[0] + ' img'); return i ? i.src : null;",
                                 f"#{elem_id}")


def message(driver) -> str:
    """The text of the page's message line (without Gradio's progress overlay)."""
    return driver.execute_script(
        "const m = document.querySelector('#message [data-testid=markdown]'); return m ? m.innerText.trim() : '';")


def set_text(driver, elem_id: str, text: str) -> None:
    """Type into a Gradio textbox / number field (its textarea or input), replacing what is there."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys(text)
    field.send_keys(Keys.TAB)  # Gradio commits a field's value on blur


def upload(driver, elem_id: str, path: Path, timeout: float = 60.0) -> None:
    """Give the file to the component's upload input (once the page has drawn it) and wait until it is shown."""
    from selenium.webdriver.common.by import By

    selector = f"#{elem_id} input[type=file]"
    wait_for(driver, "return document.querySelector(arguments[0]) !== null;", timeout, selector)
    driver.find_element(By.CSS_SELECTOR, selector).send_keys(str(Path(path).resolve()))
    wait_for(driver, IMAGE_SRC, timeout, f"#{elem_id}", "")


def press(driver, button_id: str, result_id: str, timeout: float) -> tuple[float, str]:
    """Click a button: (seconds until a new image shows in ``result_id`` or an error message, the page's
    message then; one callback sets both, so they arrive together)."""
    from selenium.webdriver.common.by import By

    before_src, before_msg = image_src(driver, result_id) or "", message(driver)
    button = driver.find_element(By.ID, button_id)
    start = time.perf_counter()
    button.click()
    wait_for(driver, RESULT, timeout, f"#{result_id}", before_src, before_msg)
    seconds = time.perf_counter() - start
    return seconds, message(driver)


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def file_url(driver, elem_id: str) -> str:
    """The download link of a Gradio File component."""
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f"#{elem_id} a[data-testid=download-link]").get_attribute("href")


def shown_image(driver, elem_id: str) -> Image.Image:
    """The image an image component shows, as served (RGB)."""
    return Image.open(BytesIO(fetch(image_src(driver, elem_id)))).convert("RGB")


def full_page_screenshot(driver, path: Path) -> None:
    """The whole page (beyond the window) as a 256-colour PNG (small enough to keep in the repository),
    written atomically."""
    import base64

    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
    image = Image.open(BytesIO(base64.b64decode(shot["data"]))).convert("RGB")
    save_image(path, image.quantize(256, method=Image.Quantize.MEDIANCUT), optimize=True)
