// Generation in the browser with onnxruntime-web, over the export's decode graph
// (model.decode.onnx): the prompt in one call, then one token per call, the state kept
// between calls. A decode step returns the current chunk's present.* (which replaces the
// held entry) and the new.* rows of the chunks it finished (usually none), appended here,
// so a token costs the same at any context. web.json (written by bsbr-export) names the
// inputs, outputs, state shapes and every file's sha256, checked before a graph is used.
// `window.bsbr.generate(options)` is what the form calls; tests call it too.

const $ = (id) => document.getElementById(id);
const ORT = { wasm: './ort/ort.wasm.min.mjs', webgpu: './ort/ort.webgpu.min.mjs' };
let meta = null;
const sessions = {};  // backend -> { ort, session, note }

function show(message, error = false) {
  $('status').textContent = message;
  $('status').className = error ? 'error' : '';
}

async function fetchChecked(name) {
  let response;
  try {
    response = await fetch(name);
  } catch (exc) {
    throw new Error(`could not fetch ${name}: ${exc.message}`);
  }
  if (!response.ok) throw new Error(`could not load ${name} (HTTP ${response.status}): is the export's web/ served whole?`);
  const bytes = new Uint8Array(await response.arrayBuffer());
  const expected = meta && meta.files[name];
  if (expected) {
    const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', bytes));
    const hex = Array.from(digest, (b) => b.toString(16).padStart(2, '0')).join('');
    if (hex !== expected) throw new Error(`${name} does not match the sha256 in web.json: it changed after export; re-export`);
  }
  return bytes;
}

async function backendFor(wanted) {
  // WebGPU only where the browser gives an adapter; else wasm, and the page says why.
  if (wanted === 'webgpu') {
    if (!navigator.gpu) return { backend: 'wasm', note: 'WebGPU unavailable (navigator.gpu is missing): fell back to wasm' };
    const adapter = await navigator.gpu.requestAdapter();
    if (!adapter) return { backend: 'wasm', note: 'WebGPU unavailable (requestAdapter() gave no adapter): fell back to wasm' };
  }
  return { backend: wanted, note: '' };
}

async function open(wanted) {
  const choice = await backendFor(wanted);
  const key = choice.backend;
  if (!sessions[key]) {
    const ort = await import(ORT[key]);
    ort.env.wasm.wasmPaths = new URL('./ort/', location.href).href;  // served here, never a CDN
    // Threads need cross-origin isolation (SharedArrayBuffer); without it, one thread.
    ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(navigator.hardwareConcurrency || 1, 8) : 1;
    const bytes = await fetchChecked(meta.graphs.decode);
    const options = { executionProviders: [key] };
    if (key === 'webgpu') {
      // The current chunk's state stays on the GPU between calls.
      options.preferredOutputLocation = Object.fromEntries(meta.state_outputs.filter((n) => n.startsWith('present.'))
        .map((n) => [n, 'gpu-buffer']));
    }
    let session;
    try {
      session = await ort.InferenceSession.create(bytes, options);
    } catch (exc) {
      if (key === 'wasm') throw exc;
      const fallback = await open('wasm');
      return { ...fallback, note: `WebGPU failed to load the graph (${exc.message}): fell back to wasm` };
    }
    sessions[key] = { ort, session, backend: key, threads: ort.env.wasm.numThreads };
  }
  return { ...sessions[key], note: choice.note };
}

function emptyState(ort) {
  const state = {};
  for (const [name, shape] of Object.entries(meta.state)) {
    const dims = shape.map((d) => (d === 'batch' ? 1 : typeof d === 'number' ? d : 0));
    state[name] = new ort.Tensor('float32', new Float32Array(dims.reduce((a, b) => a * b, 1)), dims);
  }
  return state;
}

function append(ort, past, rows, axis) {
  // past and rows along `axis` (row-major): each outer block is past's, then rows'.
  if (!rows.dims[axis]) return past;
  const dims = past.dims.slice();
  dims[axis] += rows.dims[axis];
  const inner = past.dims.slice(axis + 1).reduce((a, b) => a * b, 1);
  const outer = past.dims.slice(0, axis).reduce((a, b) => a * b, 1);
  const a = past.data, b = rows.data, out = new Float32Array(a.length + b.length);
  const sa = past.dims[axis] * inner, sb = rows.dims[axis] * inner;
  for (let o = 0; o < outer; o++) {
    out.set(a.subarray(o * sa, (o + 1) * sa), o * (sa + sb));
    out.set(b.subarray(o * sb, (o + 1) * sb), o * (sa + sb) + sa);
  }
  return new ort.Tensor('float32', out, dims);
}

function seeded(seed) {  // mulberry32: the same seed draws the same tokens
  let t = seed >>> 0;
  return () => {
    t = (t + 0x6D2B79F5) >>> 0;
    let r = Math.imul(t ^ (t >>> 15), 1 | t);
    r = (r + Math.imul(r ^ (r >>> 7), 61 | r)) ^ r;
    return ((r ^ (r >>> 14)) >>> 0) / 4294967296;
  };
}

function pick(logits, temperature, random) {
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
  if (!(temperature > 0)) return best;
  const weights = Array.from(logits, (x) => Math.exp((x - logits[best]) / temperature));
  let r = random() * weights.reduce((a, b) => a + b, 0);
  for (let i = 0; i < weights.length; i++) if ((r -= weights[i]) <= 0) return i;
  return best;
}

function encode(prompt) {
  if (Array.isArray(prompt)) return prompt;
  if (meta.tokenizer === 'bytes') return Array.from(new TextEncoder().encode(prompt));
  const ids = prompt.split(/[\s,]+/).filter(Boolean).map(Number);
  if (ids.some((i) => !Number.isInteger(i))) throw new Error('this model reads token ids: write them as integers separated by commas');
  return ids;
}

async function generate({ prompt, tokens = 64, temperature = 0, seed = 0, backend = 'wasm', keepLogits = 0, onToken = () => {} }) {
  const ids = encode(prompt);
  if (!ids.length) throw new Error('the prompt is empty');
  const bad = ids.find((i) => i < 0 || i >= meta.vocab_size);
  if (bad !== undefined) throw new Error(`token id ${bad} is out of range: this model's vocabulary is [0, ${meta.vocab_size})`);
  let { ort, session, note, backend: used, threads } = await open(backend);
  if (used !== 'wasm') {
    // A backend that loads the graph may still fail to run it (an op, the adapter): try
    // the prompt there once, and fall back to wasm with the reason if it fails.
    try {
      const probe = new ort.Tensor('int64', BigInt64Array.from(ids.map(BigInt)), [1, ids.length]);
      await session.run({ [meta.tokens]: probe, ...emptyState(ort) });
    } catch (exc) {
      delete sessions[used];
      ({ ort, session, backend: used, threads } = await open('wasm'));
      note = `WebGPU failed to run the graph (${exc.message.split('\n')[0].slice(0, 300)}): ` +
        'fell back to wasm';
    }
  }
  const random = seeded(seed);
  const utf8 = new TextDecoder('utf-8');
  let state = emptyState(ort), feed = ids;
  const made = [], logits = [], seconds = [];
  let text = '';
  for (let step = 0; step < tokens; step++) {
    const input = new ort.Tensor('int64', BigInt64Array.from(feed.map(BigInt)), [1, feed.length]);
    const start = performance.now();
    const out = await session.run({ [meta.tokens]: input, ...state });
    const last = out[meta.logits];
    const data = last.location === 'cpu' ? last.data : await last.getData();
    const row = data.subarray(data.length - meta.vocab_size);
    seconds.push((performance.now() - start) / 1000);
    const next = {};
    for (const name of Object.keys(state)) {
      const rows = out[name.replace('past.', 'new.')];
      next[name] = rows ? append(ort, state[name], rows, meta.append_axis) : out[name.replace('past.', 'present.')];
    }
    state = next;
    if (step < keepLogits) logits.push(Array.from(row));
    const token = pick(row, temperature, random);
    made.push(token);
    const piece = meta.tokenizer === 'bytes' ? utf8.decode(new Uint8Array([token]), { stream: true }) : `${token} `;
    text += piece;
    onToken(token, piece);
    feed = [token];
  }
  const decode = seconds.slice(1).sort((a, b) => a - b);
  const median = decode.length ? decode[Math.floor(decode.length / 2)] : NaN;
  return { ids: made, text, logits, prefill_ms: seconds[0] * 1000, token_ms: median * 1000,
           tokens_per_s: decode.length / decode.reduce((a, b) => a + b, 0), backend: used, threads, note,
           isolated: self.crossOriginIsolated };
}

async function main() {
  try {
    const response = await fetch('web.json');
    if (!response.ok) throw new Error(`could not load web.json (HTTP ${response.status}): is the export's web/ served whole?`);
    meta = await response.json();
  } catch (exc) {
    show(exc.message, true);
    window.bsbr = { error: exc.message };
    return;
  }
  $('model').textContent = meta.model;
  if (meta.tokenizer !== 'bytes') {
    $('prompt').value = '1, 2, 3';
    $('prompt').setAttribute('aria-label', 'prompt token ids');
  }
  window.bsbr = { generate, meta };
  $('generate').disabled = false;
  show(`Ready: ${meta.model}, ${self.crossOriginIsolated ? 'cross-origin isolated (wasm threads)' : 'not isolated (wasm: one thread)'}.`);
  $('form').addEventListener('submit', async (event) => {
    event.preventDefault();
    $('generate').disabled = true;
    $('output').textContent = '';
    const shown = document.createElement('span');
    shown.className = 'prompt';
    shown.textContent = $('prompt').value + (meta.tokenizer === 'bytes' ? '' : ' ');
    $('output').append(shown);
    show('Generating…');
    try {
      const result = await generate({
        prompt: $('prompt').value, tokens: Number($('tokens').value), temperature: Number($('temperature').value),
        seed: Number($('seed').value), backend: $('backend').value,
        onToken: (token, piece) => $('output').append(piece),
      });
      $('backend-note').textContent = result.note || `Backend: ${result.backend}` +
        (result.backend === 'wasm' ? `, ${result.threads} thread(s)` : '');
      $('stats').textContent = `${result.ids.length} tokens: ${result.tokens_per_s.toFixed(1)} tokens/s, ` +
        `${result.token_ms.toFixed(2)} ms per token (median), prompt ${result.prefill_ms.toFixed(1)} ms`;
      show('Done.');
    } catch (exc) {
      show(exc.message, true);
    } finally {
      $('generate').disabled = false;
    }
  });
}

main();
