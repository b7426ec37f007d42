"""picogpt explain's page in a real browser: headless Chromium driven by Selenium, the page opened from
file:// as a user opens it.

The page loads with no console errors, shows the tokens and the greedy next token, redraws when the layer,
head or a sampling setting changes, and computes the same candidates and probabilities as picogpt's own
sampling filters; a prompt made of HTML and script runs nothing. The last test takes the screenshot the
docs/explain.md shows, from the shipped demo model; PICOGPT_SCREENSHOT=docs/explain.png keeps it there.

Needs Debian's chromium and chromium-driver packages (make test installs them where it can); without them
these tests skip, saying so.
"""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from picogpt.explain import explain
from picogpt.explain_page import write_page
from picogpt.sampling import distribution, softmax64
from picogpt.store import load

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

BROWSER = next(filter(None, map(shutil.which, ["chromium", "chromium-browser", "google-chrome"])), None)
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (BROWSER and DRIVER), reason="no headless browser: install Debian's chromium and chromium-driver packages "
                                     "(apt-get install chromium chromium-driver; make test does it as root)")
PROMPT = "The optional argument"
INJECTION = '</script><img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'


def start_browser():
    """Headless Chromium that keeps the console's messages (tests/test_notebook.py drives one too)."""
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for argument in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,2200", "--hide-scrollbars"]:
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)


@pytest.fixture(scope="module")
def browser():
    driver = start_browser()
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def demo():
    return load("demo")


@pytest.fixture(scope="module")
def page(demo, tmp_path_factory):
    """The demo model's page for the README's prompt, with a head switched off."""
    seen = explain(demo, PROMPT, ablate=[(1, 0)], command="picogpt explain 'The optional argument' --ablate 1.0")
    return seen, write_page(seen, tmp_path_factory.mktemp("page") / "explain.html")


def open_page(browser, path):
    browser.get(Path(path).resolve().as_uri())
    browser.get_log("browser")  # from here on, only this page's messages
    browser.refresh()
    return browser


def console_errors(browser):
    return [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]


def test_page_loads_without_errors_and_shows_the_tokens_and_the_greedy_token(browser, page, demo):
    seen, path = page
    open_page(browser, path)
    assert console_errors(browser) == []
    assert browser.find_element(By.ID, "prompt").text == PROMPT
    tokens = [b.find_element(By.CSS_SELECTOR, "span").text for b in browser.find_elements(By.CSS_SELECTOR, "#tokens button")]
    assert tokens == ["The", "\u2423optional", "\u2423argument"]
    greedy = int(np.argmax(seen.next_logits))
    assert browser.find_element(By.ID, "greedy").text == seen.labels([greedy])[0]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#overview canvas")) == demo.hparams["n_layer"] * demo.hparams["n_head"]
    lens_rows = browser.find_elements(By.CSS_SELECTOR, "#lens tr")
    assert len(lens_rows) == demo.hparams["n_layer"] + 2  # the header, the embedding, each block
    last = lens_rows[-1].find_elements(By.TAG_NAME, "td")[-1]
    assert last.text.startswith(seen.labels([greedy])[0])  # the lens ends with the model's own prediction
    assert "picogpt/model.py" in browser.find_element(By.CSS_SELECTOR, ".math[data-view=attention]").text
    assert "ablate 1.0" in browser.find_element(By.ID, "made").text


def grid_picture(browser):
    return browser.execute_script("return document.getElementById('attention-grid').toDataURL()")


def test_changing_layer_head_and_query_redraws_the_attention(browser, page):
    seen, path = page
    open_page(browser, path)
    focus = browser.find_element(By.ID, "focus")
    first_picture, first_focus = grid_picture(browser), focus.text
    assert "layer 0, head 0" in first_focus
    Select(browser.find_element(By.ID, "layer")).select_by_value("2")
    Select(browser.find_element(By.ID, "head")).select_by_value("3")
    assert "layer 2, head 3" in focus.text and grid_picture(browser) != first_picture
    weights = seen.attentions[2, 3, 2]  # the focused query is the last token
    top_key = int(np.argmax(weights))
    assert f"pos {top_key} {100 * weights[top_key]:.1f}%" in focus.text.replace("\n", " ")
    Select(browser.find_element(By.ID, "head")).select_by_value("all")
    assert "all heads (mean)" in focus.text
    browser.find_elements(By.CSS_SELECTOR, "#tokens button")[1].click()  # now the second token asks
    assert "(position 1)" in focus.text
    browser.find_elements(By.CSS_SELECTOR, "#overview canvas")[0].click()  # layer 0, head 0 again
    assert "layer 0, head 0" in focus.text
    assert console_errors(browser) == []


@pytest.mark.parametrize("temperature, top_k, top_p, penalty", [
    (1.0, None, 1.0, 1.0), (0.7, 10, 1.0, 1.0), (1.3, None, 0.9, 1.0), (0.8, 40, 0.75, 1.3), (2.0, 3, 1.0, 0.7)])
def test_sampling_controls_show_picogpts_own_filtered_probabilities(browser, page, temperature, top_k, top_p, penalty):
    seen, path = page
    open_page(browser, path)
    for element_id, value in [("temperature", temperature), ("top-k", top_k), ("top-p", top_p), ("penalty", penalty)]:
        box = browser.find_element(By.ID, element_id)
        box.clear()
        if value is not None:
            box.send_keys(str(value))
    # the distribution picogpt samples from (picogpt.sampling's processors, as every decoding path applies them)
    expected = distribution(seen.next_logits, seen.ids, temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=penalty)
    survivors = int((expected > 0).sum())
    assert browser.find_element(By.ID, "next-summary").text.startswith(f"{survivors:,} of 50,257 tokens can be drawn")
    rows = browser.find_elements(By.CSS_SELECTOR, "#next-table tr[data-id]")
    shown = {int(r.get_attribute("data-id")): float(r.get_attribute("data-p")) for r in rows}
    kept = [i for i in shown if shown[i] > 0]
    assert kept == sorted(np.flatnonzero(expected), key=lambda i: (-expected[i], i))[:20]  # same survivors, same order
    for token_id, p in shown.items():
        assert p == pytest.approx(expected[token_id], rel=1e-9, abs=1e-15)
    # and the whole distribution, computed by the page's own function
    page_probs = browser.execute_script(
        "return Array.from(window.picogpt.nextDistribution(window.picogpt.data.next_logits, window.picogpt.readSettings()))")
    np.testing.assert_allclose(page_probs, expected, rtol=1e-9, atol=1e-15)
    assert console_errors(browser) == []


def test_ablation_table_compares_with_and_without_the_head(browser, page):
    seen, path = page
    open_page(browser, path)
    rows = browser.find_elements(By.CSS_SELECTOR, "#ablation-table tr[data-id]")
    assert rows
    with_all, without = softmax64(seen.next_logits[None])[0], softmax64(seen.ablated_logits[None])[0]
    for row in rows:
        token_id = int(row.get_attribute("data-id"))
        cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
        assert cells[1] != cells[2] or with_all[token_id] == without[token_id]
    assert "without 1.0" in browser.find_element(By.ID, "ablation-table").text


def test_a_prompt_of_html_and_script_is_shown_as_text_and_runs_nothing(browser, demo, tmp_path):
    path = write_page(explain(demo, INJECTION), tmp_path / "hostile.html")
    open_page(browser, path)
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text
    assert browser.execute_script("return window.pwned === undefined")
    assert browser.find_elements(By.TAG_NAME, "img") == []
    assert len(browser.find_elements(By.TAG_NAME, "script")) == 2
    assert browser.find_element(By.ID, "prompt").text == INJECTION
    assert browser.execute_script("return window.picogpt.data.prompt") == INJECTION
    assert console_errors(browser) == []


def test_screenshot_of_the_demo_models_page(browser, page, tmp_path):
    _, path = page
    open_page(browser, path)
    Select(browser.find_element(By.ID, "layer")).select_by_value("1")
    browser.find_element(By.CSS_SELECTOR, "#lens tr:last-child td:last-child").click()
    browser.set_window_size(1200, 1900)  # the header, tokens, attention, every head and the logit lens
    out = Path(os.environ.get("PICOGPT_SCREENSHOT") or tmp_path / "explain.png")
    assert browser.save_screenshot(str(out))
    assert out.stat().st_size > 50_000  # a page with pictures in it, not a blank one
    browser.set_window_size(1280, 2200)
