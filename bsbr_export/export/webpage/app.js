// Generation in the browser with onnxruntime-web, over the export's step graphs: a token
// that leaves its chunk open goes through the row step (model.rows.onnx: the current
// chunk's keys and values in c - 1 slots, fixed shapes, so WebGPU runs it); the prompt
// and every token that closes a chunk go through the decode step (model.decode.onnx, on
// wasm: its zero-sized tensors are what onnxruntime-web's WebGPU kernels cannot dispatch).
// The state stays here between calls: the row step's `row.*` and the decode step's `new.*`
// rows (the chunks it finished) are appended, its `present.*` replace their entry, so a
// token costs the same at any context. web.json (written by bsbr-export) names the inputs,
// outputs, state shapes and every file's sha256, checked before a graph is used.
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

async function session(ort, graph, backend) {
  const options = { executionProviders: [backend] };
  if (graph === 'rows' && backend === 'webgpu') {
    // The token's new key/value rows stay on the GPU, copied there into the caches.
    options.preferredOutputLocation = Object.fromEntries(meta.row_outputs.map((name) => [name, 'gpu-buffer']));
  }
  return ort.InferenceSession.create(await fetchChecked(meta.graphs[graph]), options);
}

async function open(wanted) {
  // The row step on the backend asked for; the decode step always on wasm.
  const choice = await backendFor(wanted);
  if (choice.backend === 'webgpu' && !meta.graphs.rows) {
    return { ...(await open('wasm')), note: 'WebGPU runs the row step only, and this export has none: fell back to wasm' };
  }
  const key = choice.backend;
  if (!sessions[key]) {
    const ort = await import(ORT[key]);
    ort.env.wasm.wasmPaths = new URL('./ort/', location.href).href;  // served here, never a CDN
    // Threads need cross-origin isolation (SharedArrayBuffer); without it, one thread.
    ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(navigator.hardwareConcurrency || 1, 8) : 1;
    let rows = null;
    try {
      rows = meta.graphs.rows ? await session(ort, 'rows', key) : null;
    } catch (exc) {
      if (key === 'wasm') throw exc;
      return { ...(await open('wasm')), note: `WebGPU failed to load the row step (${firstLine(exc)}): fell back to wasm` };
    }
    sessions[key] = { ort, rows, decode: await session(ort, 'decode', 'wasm'), backend: key,
                      threads: ort.env.wasm.numThreads };
  }
  return { ...sessions[key], note: choice.note };
}

function firstLine(exc) {
  return exc.message.split('\n')[0].slice(0, 300);
}

function tensor(ort, dims) {
  return new ort.Tensor('float32', new Float32Array(dims.reduce((a, b) => a * b, 1)), dims);
}

function emptyState(ort) {
  const state = {};
  for (const [name, shape] of Object.entries(meta.state)) {
    state[name] = tensor(ort, shape.map((d) => (d === 'batch' ? 1 : typeof d === 'number' ? d : 0)));
  }
  return state;
}

function blocks(dims, axis) {
  // A row-major tensor as `outer` blocks along `axis`, each row of them `inner` long.
  return { inner: dims.slice(axis + 1).reduce((a, b) => a * b, 1), outer: dims.slice(0, axis).reduce((a, b) => a * b, 1) };
}

function copyAlong(from, to, axis, offset) {
  // from's blocks into to's along `axis` at `offset`, and only as many rows as both hold.
  const { inner, outer } = blocks(from.dims, axis);
  const sf = from.dims[axis] * inner, st = to.dims[axis] * inner;
  const size = Math.min(from.dims[axis], to.dims[axis] - offset) * inner;
  for (let o = 0; o < outer; o++) to.data.set(from.data.subarray(o * sf, o * sf + size), o * st + offset * inner);
}

function append(ort, past, rows, axis) {
  if (!rows.dims[axis]) return past;
  const dims = past.dims.slice();
  dims[axis] += rows.dims[axis];
  const out = tensor(ort, dims);
  copyAlong(past, out, axis, 0);
  copyAlong(rows, out, axis, past.dims[axis]);
  return out;
}

function tokensAxis(name) {
  return meta.state[name].indexOf('past_tokens');
}

function caches(ort, state) {
  // The row step's caches from the state: the current chunk's rows in c - 1 slots.
  const feeds = {};
  for (const [name, shape] of Object.entries(meta.cache)) {
    const past = state[name.replace('cache.', 'past.')];
    const axis = tokensAxis(name.replace('cache.', 'past.'));
    if (axis < 0) {
      feeds[name] = past;
      continue;
    }
    feeds[name] = tensor(ort, shape.map((d) => (d === 'batch' ? 1 : d)));
    copyAlong(past, feeds[name], axis, 0);
  }
  return feeds;
}

function rowInputs(ort, token, position) {
  return { [meta.tokens]: new ort.Tensor('int64', BigInt64Array.from([BigInt(token)]), [1, 1]),
           [meta.positions]: new ort.Tensor('int64', BigInt64Array.from([BigInt(position)]), [1]) };
}

class GpuCache {
  // The row step's caches kept in GPU buffers between calls (WebGPU): written whole after
  // a decode step (the prompt, a chunk closing); each row step's new key/value rows come
  // out on the GPU (preferredOutputLocation) and are copied into their slot there, so per
  // token only the logits cross to the CPU. The current chunk's rows are read back once,
  // before the decode step that closes it.
  static async create(ort) {
    return new GpuCache(ort, await ort.env.webgpu.device);
  }

  constructor(ort, device) {
    this.ort = ort;
    this.device = device;
    this.buffers = {};
    this.feeds = {};
    for (const [name, shape] of Object.entries(meta.cache)) {
      const dims = shape.map((d) => (d === 'batch' ? 1 : d));
      this.buffers[name] = device.createBuffer({
        size: dims.reduce((a, b) => a * b, 4),
        usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST });
      this.feeds[name] = ort.Tensor.fromGpuBuffer(this.buffers[name], { dataType: 'float32', dims });
    }
  }

  load(state) {
    for (const [name, cache] of Object.entries(caches(this.ort, state))) {
      this.device.queue.writeBuffer(this.buffers[name], 0, cache.data);
    }
  }

  write(out, position) {
    // Each row.* ([1, ..., 1, ...], on the GPU) into its cache's slot position % c, block by block.
    const slots = meta.chunk_size - 1, slot = position % meta.chunk_size;
    const encoder = this.device.createCommandEncoder();
    for (const name of meta.row_outputs) {
      const rows = out[name], cache = name.replace('row.', 'cache.');
      const { inner, outer } = blocks(rows.dims, tokensAxis(name.replace('row.', 'past.')));
      for (let o = 0; o < outer; o++) {
        encoder.copyBufferToBuffer(rows.gpuBuffer, o * inner * 4, this.buffers[cache], (o * slots + slot) * inner * 4,
                                   inner * 4);
      }
    }
    this.device.queue.submit([encoder.finish()]);
    for (const name of meta.row_outputs) out[name].dispose();
  }

  async read(state, position) {
    // The state with its current chunk's rows (position % c of them) read back from the GPU.
    const held = position % meta.chunk_size, next = { ...state };
    for (const name of meta.row_outputs) {
      const cache = name.replace('row.', 'cache.'), past = name.replace('row.', 'past.');
      const staging = this.device.createBuffer({ size: this.buffers[cache].size,
                                                 usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
      const encoder = this.device.createCommandEncoder();
      encoder.copyBufferToBuffer(this.buffers[cache], 0, staging, 0, staging.size);
      this.device.queue.submit([encoder.finish()]);
      await staging.mapAsync(GPUMapMode.READ);
      const slots = new this.ort.Tensor('float32', new Float32Array(staging.getMappedRange().slice(0)),
                                        this.feeds[cache].dims);
      staging.unmap();
      staging.destroy();
      const axis = tokensAxis(past), dims = slots.dims.slice();
      dims[axis] = held;
      next[past] = tensor(this.ort, dims);
      copyAlong(slots, next[past], axis, 0);
    }
    return next;
  }

  dispose() {
    for (const buffer of Object.values(this.buffers)) buffer.destroy();
  }
}

async function step(ort, opened, feed, position, state, gpu) {
  // One call: the row step for a token that leaves its chunk open, else the decode step.
  // Returns the last position's logits and the state after it (and keeps `gpu` current).
  const c = meta.chunk_size;
  if (opened.rows && feed.length === 1 && position % c !== c - 1) {
    const out = await opened.rows.run({ ...rowInputs(ort, feed[0], position), ...(gpu ? gpu.feeds : caches(ort, state)) });
    if (gpu) {
      gpu.write(out, position);
      return { logits: out[meta.logits].data, state, graph: 'rows' };  // its current chunk lives on the GPU
    }
    const next = { ...state };
    for (const name of meta.row_outputs) {
      const past = name.replace('row.', 'past.');
      next[past] = append(ort, state[past], out[name], tokensAxis(past));
    }
    return { logits: out[meta.logits].data, state: next, graph: 'rows' };
  }
  if (gpu) state = await gpu.read(state, position);
  const input = new ort.Tensor('int64', BigInt64Array.from(feed.map(BigInt)), [1, feed.length]);
  const out = await opened.decode.run({ [meta.tokens]: input, ...state });
  const next = {};
  for (const name of Object.keys(state)) {
    const rows = out[name.replace('past.', 'new.')];
    next[name] = rows ? append(ort, state[name], rows, meta.append_axis) : out[name.replace('past.', 'present.')];
  }
  if (gpu) gpu.load(next);
  return { logits: out[meta.logits].data, state: next, graph: 'decode' };
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
  let opened = await open(backend);
  if (opened.backend !== 'wasm') {
    // A backend that loads the graph may still fail to run it (an op, the adapter): try
    // one row step there, and fall back to wasm with the reason if it fails.
    try {
      await opened.rows.run({ ...rowInputs(opened.ort, 0, 0), ...caches(opened.ort, emptyState(opened.ort)) });
    } catch (exc) {
      delete sessions[opened.backend];
      opened = { ...(await open('wasm')), note: `WebGPU failed to run the row step (${firstLine(exc)}): fell back to wasm` };
    }
  }
  const { ort, note, backend: used, threads } = opened;
  const gpu = used === 'webgpu' ? await GpuCache.create(ort) : null;
  const random = seeded(seed);
  const utf8 = new TextDecoder('utf-8');
  let state = emptyState(ort), feed = ids, position = 0;
  const made = [], logits = [], seconds = [], graphs = { rows: 0, decode: 0 };
  let text = '';
  try {
    for (let n = 0; n < tokens; n++) {
      const start = performance.now();
      const done = await step(ort, opened, feed, position, state, gpu);
      const row = done.logits.subarray(done.logits.length - meta.vocab_size);
      seconds.push((performance.now() - start) / 1000);
      graphs[done.graph] += 1;
      state = done.state;
      position += feed.length;
      if (n < keepLogits) logits.push(Array.from(row));
      const token = pick(row, temperature, random);
      made.push(token);
      const piece = meta.tokenizer === 'bytes' ? utf8.decode(new Uint8Array([token]), { stream: true }) : `${token} `;
      text += piece;
      onToken(token, piece);
      feed = [token];
    }
  } finally {
    if (gpu) gpu.dispose();
  }
  const decode = seconds.slice(1).sort((a, b) => a - b);
  const median = decode.length ? decode[Math.floor(decode.length / 2)] : NaN;
  return { ids: made, text, logits, prefill_ms: seconds[0] * 1000, token_ms: median * 1000,
           tokens_per_s: decode.length / decode.reduce((a, b) => a + b, 0), backend: used, threads, note, graphs,
           cache: gpu ? 'gpu-buffer' : 'cpu', isolated: self.crossOriginIsolated };
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
      $('backend-note').textContent = (result.note || `Backend: ${result.backend}` +
        (result.backend === 'wasm' ? `, ${result.threads} thread(s)` : '')) +
        `. ${result.graphs.rows} tokens went through the row step (${result.backend}), ` +
        `${result.graphs.decode} through the decode step (the prompt and chunk-closing tokens, wasm).`;
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
