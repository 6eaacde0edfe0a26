// bsbr_run: run an exported BSBR model from C++ with libtorch: traced TorchScript
// (model.pt, torch::jit::load) or an AOTInductor package (model.pt2, loaded with
// torch::inductor::AOTIModelPackageLoader; compiled for the exporting CPU's ISA).
//
//   bsbr_run MODEL.pt[2] OUT.npy --ids-file IDS.txt   one sequence per line, ids split by spaces
//   bsbr_run MODEL.pt[2] OUT.npy ID [ID ...]          one sequence from the command line
//
// Runs forward(input_ids, attention_mask) and writes the logits [batch, sequence, vocab]
// as a float32 .npy file (numpy.load reads it; the format is a short text header, then
// raw little-endian floats). Lines of different lengths are right-padded with
// attention_mask 0: only the logits at each line's own positions are meaningful.
// Exit status: 0 ok, 2 bad input (one line on stderr).
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

// Something wrong with what the user passed: one line on stderr, exit status 2.
struct UserError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

using Sequences = std::vector<std::vector<int64_t>>;

const char* const kUsage = "usage: bsbr_run MODEL.pt[2] OUT.npy (--ids-file IDS.txt | ID [ID ...])";

// TorchScript interpreter errors run to many lines (both tracebacks); the last one
// ("RuntimeError: index out of range in self") says what happened.
std::string last_line(std::string text) {
  text.erase(text.find_last_not_of("\n ") + 1);
  return text.substr(text.rfind('\n') + 1);  // npos + 1 == 0: a one-line message whole
}

int64_t parse_id(const std::string& word) {
  size_t used = 0;
  long long value = -1;
  try {
    value = std::stoll(word, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != word.size() || value < 0) {
    throw UserError("token id '" + word + "' is not a non-negative integer: pass ids like 17 4 250");
  }
  return value;
}

Sequences read_ids_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw UserError("cannot read ids file " + path + ": check the path");
  Sequences sequences;
  std::string line, word;
  while (std::getline(in, line)) {
    std::istringstream words(line);
    std::vector<int64_t> ids;
    while (words >> word) ids.push_back(parse_id(word));
    if (!ids.empty()) sequences.push_back(std::move(ids));
  }
  if (sequences.empty()) throw UserError("ids file " + path + " holds no token ids: write one sequence per line");
  return sequences;
}

// input_ids and attention_mask [batch, longest]: right-padded with id 0, mask 0.
std::pair<torch::Tensor, torch::Tensor> to_tensors(const Sequences& sequences) {
  size_t longest = 0;
  for (const auto& ids : sequences) longest = std::max(longest, ids.size());
  auto input_ids = torch::zeros({static_cast<int64_t>(sequences.size()), static_cast<int64_t>(longest)}, torch::kInt64);
  auto attention_mask = torch::zeros_like(input_ids);
  auto ids_at = input_ids.accessor<int64_t, 2>();
  auto mask_at = attention_mask.accessor<int64_t, 2>();
  for (size_t row = 0; row < sequences.size(); ++row) {
    for (size_t col = 0; col < sequences[row].size(); ++col) {
      ids_at[row][col] = sequences[row][col];
      mask_at[row][col] = 1;
    }
  }
  return {input_ids, attention_mask};
}

// A full-sequence model: forward(self, input_ids, attention_mask). The streaming graph
// (model.streaming.pt) takes the past.* state as well, so it is refused here by name.
torch::jit::Module load_model(const std::string& path) {
  if (!std::ifstream(path)) throw UserError("cannot read model " + path + ": check the path");
  torch::jit::Module module;
  try {
    module = torch::jit::load(path, torch::kCPU);
  } catch (const c10::Error&) {
    throw UserError(path + " is not a TorchScript file this libtorch can load: "
                    "export one with bsbr-export export MODEL --format torchscript");
  }
  auto method = module.find_method("forward");
  if (!method || method->function().getSchema().arguments().size() != 3) {
    throw UserError(path + " does not take (input_ids, attention_mask): pass the full-sequence model.pt, "
                    "not model.streaming.pt");
  }
  module.eval();
  return module;
}

// (input_ids, attention_mask) -> the model's output, whichever format it was loaded from.
using Forward = std::function<torch::Tensor(const torch::Tensor&, const torch::Tensor&)>;

Forward load_torchscript(const std::string& path) {
  auto module = std::make_shared<torch::jit::Module>(load_model(path));
  return [module](const torch::Tensor& input_ids, const torch::Tensor& attention_mask) {
    torch::IValue output = module->forward({input_ids, attention_mask});
    if (!output.isTensor()) throw UserError("the model did not return a tensor: pass a bsbr-export model.pt");
    return output.toTensor();
  };
}

// model.pt2: the whole forward compiled ahead of time (bsbr-export export MODEL --format aoti).
Forward load_aoti(const std::string& path) {
  if (!std::ifstream(path)) throw UserError("cannot read model " + path + ": check the path");
  std::shared_ptr<torch::inductor::AOTIModelPackageLoader> loader;
  try {
    loader = std::make_shared<torch::inductor::AOTIModelPackageLoader>(path);
  } catch (const std::exception& error) {
    throw UserError(path + " is not an AOTInductor package this libtorch can load (" + last_line(error.what()) +
                    "): export one with bsbr-export export MODEL --format aoti");
  }
  return [loader](const torch::Tensor& input_ids, const torch::Tensor& attention_mask) {
    auto outputs = loader->run({input_ids, attention_mask});
    if (outputs.size() != 1) throw UserError("the package does not return logits alone: pass the full-graph model.pt2");
    return outputs[0];
  };
}

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

torch::Tensor run(const Forward& forward, const torch::Tensor& input_ids, const torch::Tensor& attention_mask) {
  c10::InferenceMode guard;
  torch::Tensor output;
  try {
    output = forward(input_ids, attention_mask);
  } catch (const UserError&) {
    throw;
  } catch (const std::exception& error) {  // c10::Error, or the interpreter's JITException
    throw UserError("the model rejected the input (" + last_line(error.what()) +
                    "): check the ids are below the model's vocab size");
  }
  if (output.dim() != 3) {
    throw UserError("the model did not return logits [batch, sequence, vocab]: pass a bsbr-export model.pt or .pt2");
  }
  return output.to(torch::kFloat32).contiguous();
}

// .npy version 1.0: magic, header length, a Python-dict header padded to 64 bytes, data.
// '<f4' is little-endian float32, which is what x86-64 and arm64 hosts hold in memory.
void write_npy(const torch::Tensor& tensor, const std::string& path) {
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (";
  for (auto dim : tensor.sizes()) header += std::to_string(dim) + ", ";
  header += "), }";
  const size_t preamble = 10;  // magic (6) + version (2) + header length (2)
  header.append(63 - (preamble + header.size()) % 64, ' ');
  header += '\n';
  const uint16_t header_size = static_cast<uint16_t>(header.size());

  // Written beside OUT, then renamed: a failed run never leaves a half-written file.
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary);
    if (!out) throw UserError("cannot write " + path + ": check the directory exists and is writable");
    out.write("\x93NUMPY\x01\x00", 8);
    const char size_bytes[2] = {static_cast<char>(header_size & 0xff), static_cast<char>(header_size >> 8)};
    out.write(size_bytes, 2);
    out.write(header.data(), header.size());
    out.write(static_cast<const char*>(tensor.data_ptr()), tensor.numel() * sizeof(float));
    if (!out) throw UserError("cannot write " + path + ": disk full?");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw UserError("cannot write " + path + ": check the directory is writable");
  }
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc < 4) throw UserError(kUsage);
    const std::string model_path = argv[1], out_path = argv[2];
    Sequences sequences;
    if (std::string(argv[3]) == "--ids-file") {
      if (argc != 5) throw UserError(kUsage);
      sequences = read_ids_file(argv[4]);
    } else {
      sequences.emplace_back();
      for (int i = 3; i < argc; ++i) sequences.back().push_back(parse_id(argv[i]));
    }
    const Forward forward = ends_with(model_path, ".pt2") ? load_aoti(model_path) : load_torchscript(model_path);
    auto [input_ids, attention_mask] = to_tensors(sequences);
    auto logits = run(forward, input_ids, attention_mask);
    write_npy(logits, out_path);
    std::cout << "logits " << logits.sizes() << " -> " << out_path << "\n";
    return 0;
  } catch (const UserError& error) {
    std::cerr << "bsbr_run: error: " << error.what() << "\n";
    return 2;
  }
}
