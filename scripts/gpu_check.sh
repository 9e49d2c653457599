#!/usr/bin/env bash
# The whole recipe on GPUs, as a user runs it: pretrain -> sft -> dpo -> grpo, each stage init_from the previous
# stage's HF export, a few steps each on the built-in sample data; then the same chain under FSDP2 on 2 GPUs
# (torchrun; there SFT starts from pretraining's distributed-checkpoint folder, the later stages from HF exports); then a few steps of the full Moxin-7B on 2 GPUs. After every stage scripts/check_run.py checks that
# it ran, that its metrics and final weights are finite, and that the hand-off loaded the previous stage's final
# weights (parameter checksums in summary.json; GRPO's SFT warm-up, a run of its own in grpo/warmup, sits between
# DPO and GRPO: it must start from DPO's final weights and GRPO from its own). The one-GPU part ends with an adapter
# pass: SFT with LoRA from the pretraining export, DPO with LoRA (QLoRA where torchao is installed) from the SFT's
# merged export, GRPO with LoRA (and its LoRA warm-up) from the DPO's; each LoRA run's hf_adapter/ PEFT folder is
# checked to exist, and check_run.py checks every hand-off as in the chain.
#
#   bash scripts/gpu_check.sh            # all parts the machine can run (fsdp and 7b need 2 GPUs)
#   bash scripts/gpu_check.sh single     # only the one-GPU chain and its adapter pass
#   bash scripts/gpu_check.sh chain      # only the one-GPU chain, without its adapter pass
#   bash scripts/gpu_check.sh adapter    # only the adapter pass (after a pretraining run of its own), on one GPU
#   also: fsdp, 7b; cpu, adapter_cpu, fsdp_cpu (the same on the CPU, where no GPU is)
#
# Environment: GPU_CHECK_DIR (default runs/gpu_check, wiped first), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DIR=${GPU_CHECK_DIR:-runs/gpu_check}
PARTS=${*:-single fsdp 7b}
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
export PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1
rm -rf "$DIR"
mkdir -p "$DIR"
declare -a REPORT=()

stage() {  # stage <tag> <name> <previous name[:ckpt] or -> <launcher...> -- <overrides...>
  local tag=$1 name=$2 prev=${3%:ckpt} from=hf; [[ $3 == *:ckpt ]] && from=checkpoints/last.ckpt; shift 3
  local launch=() ; while [[ $1 != -- ]]; do launch+=("$1"); shift; done; shift
  local out="$DIR/$tag/$name" init=()
  [[ $prev != - ]] && init=("init_from=$DIR/$tag/$prev/$from")
  local t0=$SECONDS
  echo "=== [$tag] $name $( [[ $prev != - ]] && echo "(init_from $prev/$from)")"
  "${launch[@]}" -m moxin.run "$@" "${init[@]}" run_name="$tag-$name" out_dir="$out" trainer.progress_bar=plain \
    > "$DIR/$tag-$name.log" 2>&1 || { tail -40 "$DIR/$tag-$name.log"; echo "FAIL [$tag] $name: exit code $?"; exit 1; }
  local after=() ; [[ $prev != - ]] && after=(--after "$DIR/$tag/$prev")
  local line; line=$($PY scripts/check_run.py "$out" "${after[@]}" --rel-tol 1e-6) || { echo "$line"; exit 1; }
  echo "$line ($((SECONDS - t0)) s wall)"
  REPORT+=("$line ($((SECONDS - t0)) s wall)")
}

pretrain() {  # pretrain <tag> <launcher...> -- <hardware overrides...>: the chain's first run, 12 steps
  local tag=$1; shift
  stage "$tag" pretrain - "$@" trainer.max_steps=12 trainer.val_every_n_steps=4
}

chain() {  # chain <tag> <sft's source: hf or ckpt> <launcher...> -- <hardware overrides...>
  local tag=$1 src=$2; shift 2
  local launch=() ; while [[ $1 != -- ]]; do launch+=("$1"); shift; done; shift
  local hw=("$@") pre=pretrain
  [[ $src == ckpt ]] && pre=pretrain:ckpt  # SFT starts from the checkpoint itself (FSDP: a distributed checkpoint)
  pretrain "$tag" "${launch[@]}" -- "${hw[@]}"
  stage "$tag" sft $pre "${launch[@]}" -- +experiment=sft "${hw[@]}" trainer.max_steps=10
  stage "$tag" dpo sft "${launch[@]}" -- +experiment=dpo "${hw[@]}" trainer.max_steps=10 \
    stage.ref_cache_dir="$DIR/$tag/refcache"
  stage "$tag" grpo dpo "${launch[@]}" -- +experiment=grpo "${hw[@]}" data.steps=4 warmup.steps=4 \
    stage.grpo.kl_coef=0.001 export_hf=true
}

adapters() {  # adapters <tag> <launcher...> -- <hardware overrides...>: after pretrain <tag>, SFT with LoRA from
  # its export, DPO with LoRA (QLoRA where torchao is installed) from that SFT's merged export, GRPO with LoRA from
  # the DPO's (its SFT warm-up with the same adapters in between)
  local tag=$1; shift
  local launch=() ; while [[ $1 != -- ]]; do launch+=("$1"); shift; done; shift
  local hw=("$@") q=() lora=(stage.lora.rank=16 stage.lora.alpha=32)
  $PY -c "import torchao" >/dev/null 2>&1 && q=(stage.lora.quantize=nf4)
  stage "$tag" sft_lora pretrain "${launch[@]}" -- +experiment=sft "${hw[@]}" "${lora[@]}" trainer.max_steps=10
  stage "$tag" dpo_lora sft_lora "${launch[@]}" -- +experiment=dpo "${hw[@]}" "${lora[@]}" "${q[@]}" \
    trainer.max_steps=10
  stage "$tag" grpo_lora dpo_lora "${launch[@]}" -- +experiment=grpo "${hw[@]}" "${lora[@]}" data.steps=4 \
    warmup.steps=4 stage.grpo.kl_coef=0.001 export_hf=true
  for run in sft_lora dpo_lora grpo_lora; do
    [[ -f $DIR/$tag/$run/hf_adapter/adapter_config.json ]] || { echo "FAIL [$tag] $run: no hf_adapter/"; exit 1; }
  done
}

for part in $PARTS; do
  case $part in
    single)
      chain gpu hf $PY -- hardware=gpu
      adapters gpu $PY -- hardware=gpu ;;
    chain)  # the one-GPU chain without its adapter pass (single = chain + the pass on the chain's export)
      chain gpu hf $PY -- hardware=gpu ;;
    adapter)
      pretrain adapter $PY -- hardware=gpu
      adapters adapter $PY -- hardware=gpu ;;
    fsdp)
      if (( NGPU < 2 )); then echo "=== [fsdp] skipped: $NGPU GPU(s)"; continue; fi
      chain fsdp ckpt $PY -m torch.distributed.run --standalone --nproc_per_node 2 -- hardware=fsdp hardware.devices=2 ;;
    7b)
      if (( NGPU < 2 )); then echo "=== [7b] skipped: $NGPU GPU(s)"; continue; fi
      # the full Moxin-7B (36 blocks), FSDP2 over 2 GPUs, one 4K-token phase on the sample corpus
      stage 7b pretrain - $PY -m torch.distributed.run --standalone --nproc_per_node 2 -- model=moxin-7b \
        hardware=fsdp hardware.devices=2 schedule.tokens_per_step=16384 schedule.micro_batch_tokens=8192 \
        "schedule.phases=[{name: ctx4k, seq_len: 4096, tokens: 65536, mixture: {prose: 0.45, code: 0.35, cjk: 0.2}}]" \
        trainer.max_steps=3 trainer.val_every_n_steps=3 data.val_tokens=8192 export_hf=false \
        "samples.prompts=[The history of the]" samples.max_new_tokens=8 ;;
    cpu)  # the one-GPU chain's steps on the CPU: checks this script (and the chain) where no GPU is
      chain cpu hf $PY -- hardware=cpu
      adapters cpu $PY -- hardware=cpu ;;
    adapter_cpu)  # the adapter pass on the CPU
      pretrain adapter_cpu $PY -- hardware=cpu
      adapters adapter_cpu $PY -- hardware=cpu ;;
    fsdp_cpu)  # the FSDP2 chain on 2 CPU processes (gloo): the sharded hand-offs where no GPU is
      chain fsdp_cpu ckpt $PY -m torch.distributed.run --standalone --nproc_per_node 2 -- hardware=fsdp_cpu ;;
    *) echo "unknown part $part (single, chain, adapter, fsdp, 7b, cpu, adapter_cpu, fsdp_cpu)"; exit 2 ;;
  esac
done
echo "=== gpu_check: every stage passed"
printf '%s\n' "${REPORT[@]}"
