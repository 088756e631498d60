#!/usr/bin/env bash
# krew-manifest.sh DIR: writes DIR/txr.yaml, deploy/krew/txr.yaml with each
# platform's sha256 taken from its archive in DIR (named as the last part of
# its uri). Fails when an archive is missing, so a release never publishes a
# manifest krew would refuse.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${1:?usage: krew-manifest.sh DIR (holding the release archives)}"
template="$root/deploy/krew/txr.yaml"
out="$dir/txr.yaml.tmp"
: >"$out"
while IFS= read -r line; do
    case "$line" in
        *"uri: "*)
            archive="$dir/${line##*/}"
            [ -f "$archive" ] || { echo "krew-manifest.sh: $archive is missing" >&2; rm -f "$out"; exit 1; }
            sha="$(sha256sum "$archive" | cut -d' ' -f1)"
            printf '%s\n' "$line" >>"$out"
            ;;
        *"sha256: "*)
            [ -n "${sha:-}" ] || { echo "krew-manifest.sh: a sha256 before its uri in $template" >&2; rm -f "$out"; exit 1; }
            printf '%s%s\n' "${line%%sha256: *}" "sha256: $sha" >>"$out"
            sha=""
            ;;
        *) printf '%s\n' "$line" >>"$out" ;;
    esac
done <"$template"
mv "$out" "$dir/txr.yaml"
echo "wrote $dir/txr.yaml" >&2
