"""Convert Mistral's v0.3 sentencepiece model into the `tokenizer.json` this repo ships.

Run once, by a maintainer (needs `pip install sentencepiece protobuf`):

    python convert_tokenizer.py [--model PATH] [--out tokenizer.json]

The sentencepiece file ships in the PyPI wheel mistral-common
(mistral_common/data/mistral_instruct_tokenizer_240323.model.v3); a copy is kept in reference/
(Apache 2.0, see reference/NOTICE) as the default input and the tests' reference. The runtime needs only
`tokenizers`. What makes the conversion faithful (checked against sentencepiece by
test_model.py::test_tokenizer_matches_sentencepiece):
- BPE merges are ordered by the score of the merged piece, highest first, as sentencepiece picks
  them; the whitespace-run pieces (score -1e9) therefore merge last. Ordering by id is wrong.
- the dummy prefix `▁` is always prepended and every space becomes `▁` (no pre-tokenizer:
  pieces never span a word boundary, so encoding the whole text at once is equivalent);
- byte fallback stays on: a character outside the vocab becomes its UTF-8 bytes <0x..>;
- no special tokens are registered, so `<s>` or `[INST]` typed in a document stays text, as with
  sentencepiece (BOS/EOS are added by id where documents are packed; a post-processor adds <s>
  by id when a caller asks for special tokens, as HF's AutoTokenizer does by default). One known difference:
  sentencepiece also matches its 20 user-defined pieces ([REFERENCE_DOC_n], ids 751-770) in raw
  text; here that text stays ordinary text. Registering them as added tokens would split the
  input around them and put a second dummy prefix after each one (measured), which is worse.
"""

import argparse
import json
from pathlib import Path

from config import SENTENCEPIECE_FILE

NORMAL = 1  # sentencepiece's piece type for ordinary pieces



def convert(model_path: Path):
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import Tokenizer, decoders, models, normalizers, processors

    proto = pb.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    assert proto.trainer_spec.model_type == pb.TrainerSpec.BPE, "expected a BPE model"
    pieces = proto.pieces
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    merges = []  # (score of the merged piece, its id, left id, right id, left, right)
    for i, p in enumerate(pieces):
        if p.type != NORMAL or len(p.piece) < 2:
            continue
        for k in range(1, len(p.piece)):
            left, right = p.piece[:k], p.piece[k:]
            if left in vocab and right in vocab:
                merges.append((-p.score, i, vocab[left], vocab[right], left, right))
    merges.sort()
    bpe = models.BPE(vocab=vocab, merges=[(m[4], m[5]) for m in merges], unk_token="<unk>",
                     byte_fallback=True, fuse_unk=True)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # Encoding with add_special_tokens=True (HF's default, as AutoTokenizer does) prepends <s>
    # by id, like Llama tokenizers; this repo's own code encodes with add_special_tokens=False
    # and adds <s>/</s> itself.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return tok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=SENTENCEPIECE_FILE)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "tokenizer.json")
    args = ap.parse_args()
    model = args.model
    tok = convert(model)
    tok.save(str(args.out))
    # Keep the file diff-friendly and stable: tokenizers writes it with no trailing newline.
    data = json.loads(args.out.read_text())
    args.out.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {args.out} ({tok.get_vocab_size()} ids) from {model}")


if __name__ == "__main__":
    main()
