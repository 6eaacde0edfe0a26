// onnxruntime-web (wasm) under Node, for bsbr_export.runtime.ortweb: one graph, many calls.
//   node ortweb_worker.mjs DIST MODEL.onnx
// DIST is onnxruntime-web's dist/. Reads one JSON request per line on stdin, {name: {dtype,
// dims, data (base64)}}, and writes one JSON line per request: {"outputs": {...}} or
// {"error": "..."}. The first line it writes says whether the graph loaded.
import { createInterface } from 'node:readline';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

const [dist, model] = process.argv.slice(2);
const ort = await import(pathToFileURL(join(dist, 'ort.node.min.mjs')).href);
ort.env.wasm.numThreads = 1;
const TYPES = { float32: Float32Array, int64: BigInt64Array, int32: Int32Array };
const reply = (value) => process.stdout.write(JSON.stringify(value) + '\n');

let session;
try {
  session = await ort.InferenceSession.create(model, { executionProviders: ['wasm'] });
  reply({ loaded: true, inputs: session.inputNames, outputs: session.outputNames });
} catch (error) {
  reply({ error: String(error.message || error) });
  process.exit(0);
}

for await (const line of createInterface({ input: process.stdin })) {
  try {
    const feeds = {};
    for (const [name, { dtype, dims, data }] of Object.entries(JSON.parse(line))) {
      const bytes = Buffer.from(data, 'base64');
      const array = new TYPES[dtype](bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength));
      feeds[name] = new ort.Tensor(dtype, array, dims);
    }
    const results = await session.run(feeds);
    const outputs = {};
    for (const [name, tensor] of Object.entries(results)) {
      const view = Buffer.from(tensor.data.buffer, tensor.data.byteOffset, tensor.data.byteLength);
      outputs[name] = { dtype: tensor.type, dims: tensor.dims, data: view.toString('base64') };
    }
    reply({ outputs });
  } catch (error) {
    reply({ error: String(error.message || error) });
  }
}
