"""moxin's data: one reader for every source kind (reader.py), one bad-record counter (bad_records.py), per-stage
extractors (extract.py), and a data module per stage (pretrain_data, sft_data, dpo_data, grpo_data) over one base
(base.py: MoxinDataModule). docs/architecture.md has the map."""
