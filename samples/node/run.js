#!/usr/bin/env node
// Run an exported BSBR model (model.onnx) from Node.js with onnxruntime-node.
//
//   node run.js EXPORT_DIR ID [ID ...]                 one sequence from the command line
//   node run.js EXPORT_DIR --ids-file IDS.txt          one sequence per line, ids split by spaces
//   node run.js EXPORT_DIR ... --out logits.json       write the JSON to a file instead of stdout
//
// EXPORT_DIR is what `bsbr-export export MODEL --format onnx` wrote. The graph's sha256 is
// checked against the directory's manifest.json before it is loaded. Lines of different
// lengths are right-padded with attention_mask 0: only the logits at each line's own
// positions are meaningful. Prints {"dims": [batch, sequence, vocab], "logits": nested
// arrays of that shape} (float32 values, written exactly).
// Exit status: 0 ok, 2 bad input (one line on stderr).
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const ort = require('onnxruntime-node');

const MANIFEST = 'manifest.json';
const ARTIFACT = 'model.onnx';
const USAGE = 'usage: node run.js EXPORT_DIR (ID [ID ...] | --ids-file IDS.txt) [--out FILE.json]';

// Something wrong with what the user passed: one line on stderr, exit status 2.
class UserError extends Error {}

function parseArgs(argv) {
  const args = { ids: [], idsFile: null, out: null, exportDir: null };
  for (let i = 0; i < argv.length; i++) {
    const word = argv[i];
    if (word === '--ids-file' || word === '--out') {
      if (i + 1 >= argv.length) throw new UserError(`${word} needs a value: ${USAGE}`);
      args[word === '--out' ? 'out' : 'idsFile'] = argv[++i];
    } else if (word === '-h' || word === '--help') {
      console.log(USAGE);
      process.exit(0);
    } else if (word.startsWith('--')) {
      throw new UserError(`unknown option ${word}: ${USAGE}`);
    } else if (args.exportDir === null) {
      args.exportDir = word;
    } else {
      args.ids.push(word);
    }
  }
  if (args.exportDir === null) throw new UserError(`no export directory given: ${USAGE}`);
  return args;
}

function sha256(file) {
  return crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

function loadManifest(exportDir) {
  if (!fs.existsSync(exportDir) || !fs.statSync(exportDir).isDirectory()) {
    throw new UserError(`${exportDir} is not a directory: pass the directory \`bsbr-export export\` wrote`);
  }
  const file = path.join(exportDir, MANIFEST);
  if (!fs.existsSync(file)) {
    throw new UserError(`${exportDir} has no ${MANIFEST}: is it an export directory? (run \`bsbr-export export\`)`);
  }
  let manifest;
  try {
    manifest = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (err) {
    throw new UserError(`${file} is not valid JSON: ${err.message}`);
  }
  if (!manifest || !Array.isArray(manifest.artifacts)) {
    throw new UserError(`${file} is not a bsbr-export manifest (no 'artifacts' list)`);
  }
  return manifest;
}

// The artifact's path, after every file of it (the graph, and its external weights when
// there are any) matched the sha256 the manifest records.
function verifiedArtifact(exportDir, manifest, name) {
  const artifact = manifest.artifacts.find((a) => a.name === name);
  if (!artifact) {
    throw new UserError(`${path.join(exportDir, MANIFEST)} lists no ${name}: export with --format onnx`);
  }
  for (const [fileName, record] of Object.entries(artifact.files)) {
    const file = path.join(exportDir, fileName);
    if (!fs.existsSync(file)) {
      throw new UserError(`${file} is listed in ${MANIFEST} but missing: copy the whole export directory`);
    }
    if (sha256(file) !== record.sha256) {
      throw new UserError(`${file} does not match its sha256 in ${MANIFEST}: it changed after export; re-export`);
    }
  }
  return path.join(exportDir, name);
}

function parseIds(words, where) {
  return words.map((word) => {
    if (!/^[0-9]+$/.test(word)) {
      throw new UserError(`token id '${word}' in ${where} is not a non-negative integer: pass ids like 17 4 250`);
    }
    return Number(word);
  });
}

// One sequence from argv, or one per non-empty line of the ids file.
function readSequences(args) {
  if (args.ids.length && args.idsFile) {
    throw new UserError('pass token ids on the command line or with --ids-file, not both');
  }
  if (args.ids.length) return [parseIds(args.ids, 'the command line')];
  if (!args.idsFile) throw new UserError('no token ids: pass ids like `17 4 250` or --ids-file IDS.txt');
  let text;
  try {
    text = fs.readFileSync(args.idsFile, 'utf8');
  } catch (err) {
    throw new UserError(`cannot read --ids-file ${args.idsFile}: ${err.code}`);
  }
  const sequences = text
    .split('\n')
    .map((line, n) => ({ words: line.trim().split(/\s+/).filter(Boolean), n: n + 1 }))
    .filter(({ words }) => words.length)
    .map(({ words, n }) => parseIds(words, `${args.idsFile} line ${n}`));
  if (!sequences.length) throw new UserError(`${args.idsFile} holds no token ids: write one sequence per line`);
  return sequences;
}

// Right-padded input_ids and attention_mask, both int64 [batch, longest].
function feeds(sequences, vocabSize) {
  const length = Math.max(...sequences.map((s) => s.length));
  const ids = new BigInt64Array(sequences.length * length);
  const mask = new BigInt64Array(sequences.length * length);
  sequences.forEach((sequence, row) => {
    sequence.forEach((id, col) => {
      if (id >= vocabSize) {
        throw new UserError(`token id ${id} is out of range: this model's vocabulary is [0, ${vocabSize})`);
      }
      ids[row * length + col] = BigInt(id);
      mask[row * length + col] = 1n;
    });
  });
  const dims = [sequences.length, length];
  return { input_ids: new ort.Tensor('int64', ids, dims), attention_mask: new ort.Tensor('int64', mask, dims) };
}

// A flat Float32Array of shape [batch, sequence, vocab] -> nested arrays.
function nest(data, [batch, sequence, vocab]) {
  const row = (b, t) => Array.from(data.subarray((b * sequence + t) * vocab, (b * sequence + t + 1) * vocab));
  return Array.from({ length: batch }, (_, b) => Array.from({ length: sequence }, (_, t) => row(b, t)));
}

// Write via a temp file beside `file`, so a failed run leaves no half-written file.
function writeAtomic(file, text) {
  const dir = path.dirname(path.resolve(file));
  if (!fs.existsSync(dir)) throw new UserError(`cannot write ${file}: directory ${dir} does not exist`);
  const tmp = path.join(dir, `.${path.basename(file)}.${process.pid}.tmp`);
  try {
    fs.writeFileSync(tmp, text);
    fs.renameSync(tmp, file);
  } finally {
    fs.rmSync(tmp, { force: true });
  }
}

async function main(argv) {
  const args = parseArgs(argv);
  const manifest = loadManifest(args.exportDir);
  const modelPath = verifiedArtifact(args.exportDir, manifest, ARTIFACT);
  const inputs = feeds(readSequences(args), manifest.config.vocab_size);
  let session;
  try {
    session = await ort.InferenceSession.create(modelPath, { executionProviders: ['cpu'] });
  } catch (err) {
    throw new UserError(`${modelPath} is not a loadable ONNX model: ${String(err.message).split('\n')[0]}`);
  }
  // "logits", or "hidden_states" for a model exported without its LM head
  const output = (await session.run(inputs))[session.outputNames[0]];
  const text = JSON.stringify({ dims: output.dims, logits: nest(output.data, output.dims) });
  if (args.out) writeAtomic(args.out, text + '\n');
  else console.log(text);
}

main(process.argv.slice(2)).catch((err) => {
  if (!(err instanceof UserError)) throw err;
  console.error(`error: ${err.message}`);
  process.exitCode = 2;
});
