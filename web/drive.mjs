// Drive an export's web page in headless Chromium (puppeteer-core, the system's browser:
// nothing is downloaded) and print what it did as one JSON line.
//
//   node web/drive.mjs URL '{"prompt": [1, 2, 3], "tokens": 16, "keepLogits": 4}' [--ui SCREENSHOT.png]
//
// Without --ui it calls the page's window.bsbr.generate(options) and prints its result;
// with --ui it fills the form, presses Generate, waits for the page to finish and saves a
// screenshot, printing the status, output and stats the page shows. Errors the page
// threw or logged come back in "errors". $CHROMIUM names the browser (default
// /usr/bin/chromium); $BSBR_WEBGPU=1 adds the flags that expose WebGPU without a GPU
// (Chromium's own SwiftShader adapter, on the CPU).
import puppeteer from 'puppeteer-core';

const [url, optionsText = '{}', flag, screenshot] = process.argv.slice(2);
const options = JSON.parse(optionsText);
const args = ['--no-sandbox', '--disable-dev-shm-usage'];
if (process.env.BSBR_WEBGPU === '1') {
  args.push('--enable-unsafe-webgpu', '--use-webgpu-adapter=swiftshader', '--enable-unsafe-swiftshader');
}
const browser = await puppeteer.launch({ executablePath: process.env.CHROMIUM || '/usr/bin/chromium', headless: true,
                                         args, protocolTimeout: 600_000 });
const errors = [];
try {
  const page = await browser.newPage();
  page.on('pageerror', (error) => errors.push(error.message));
  page.on('console', (message) => { if (message.type() === 'error') errors.push(message.text()); });
  page.on('requestfailed', (request) => errors.push(`${request.url()}: ${request.failure()?.errorText}`));
  const started = performance.now();
  await page.goto(url, { waitUntil: 'load', timeout: 120_000 });
  await page.waitForFunction(() => window.bsbr !== undefined, { timeout: 120_000 });
  const loadMs = performance.now() - started;
  let result;
  if (flag === '--ui') {
    await page.evaluate((o) => {
      document.getElementById('prompt').value = o.text ?? o.prompt;
      document.getElementById('tokens').value = String(o.tokens ?? 32);
      document.getElementById('backend').value = o.backend ?? 'wasm';
      document.getElementById('temperature').value = String(o.temperature ?? 0);
      document.getElementById('seed').value = String(o.seed ?? 0);
    }, options);
    await page.click('#generate');
    await page.waitForFunction(() => ['Done.'].includes(document.getElementById('status').textContent)
      || document.getElementById('status').className === 'error', { timeout: 600_000 });
    result = await page.evaluate(() => ({
      status: document.getElementById('status').textContent, output: document.getElementById('output').textContent,
      stats: document.getElementById('stats').textContent, note: document.getElementById('backend-note').textContent,
    }));
    await page.screenshot({ path: screenshot, fullPage: true });
  } else {
    result = await page.evaluate(async (o) => {
      if (window.bsbr.error) return { error: window.bsbr.error };
      try {
        return await window.bsbr.generate(o);
      } catch (error) {
        return { error: error.message };
      }
    }, options);
  }
  const transferred = await page.evaluate(() => performance.getEntriesByType('resource')
    .reduce((sum, entry) => sum + (entry.transferSize || entry.encodedBodySize || 0), 0));
  console.log(JSON.stringify({ ...result, load_ms: loadMs, transferred_bytes: transferred, errors }));
} finally {
  await browser.close();
}
