"""Generated from protos/til/v1 by scripts/gen_protos.sh; do not edit."""
