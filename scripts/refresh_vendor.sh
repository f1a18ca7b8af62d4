#!/bin/sh
# Re-download the chat page's vendored libraries (phi_onnx/serve/static/assets/vendor) at exactly the pinned
# versions below, from the npm registry, and rewrite SHA256SUMS. `npm pack` checks each tarball against
# the registry's integrity hash. With --check, compare instead of writing: exit 1 if anything differs.
# To upgrade: change a version here, run this script, try the page, commit the result.
set -eu

MARKED=marked@18.3.0
DOMPURIFY=dompurify@3.5.0
HIGHLIGHT=@highlightjs/cdn-assets@11.12.0

root=$(cd "$(dirname "$0")/.." && pwd)
vendor="$root/phi_onnx/serve/static/assets/vendor"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/out"
cd "$work"

unpack() {  # unpack NAME@VERSION into $work/NAME/package
    tarball=$(npm pack --silent "$1" | tail -n 1)
    mkdir -p "$2" && tar -xzf "$tarball" -C "$2"
}
unpack "$MARKED" marked
unpack "$DOMPURIFY" dompurify
unpack "$HIGHLIGHT" highlight

cp marked/package/lib/marked.umd.js out/marked.umd.js
cp marked/package/LICENSE out/LICENSE.marked
cp dompurify/package/dist/purify.min.js out/purify.min.js
cp dompurify/package/LICENSE out/LICENSE.dompurify
cp highlight/package/highlight.min.js out/highlight.min.js
cp highlight/package/styles/github.min.css out/highlight-github.min.css
cp highlight/package/styles/github-dark.min.css out/highlight-github-dark.min.css
cp highlight/package/LICENSE out/LICENSE.highlight
printf '%s\n' "$MARKED" "$DOMPURIFY" "$HIGHLIGHT" > out/VERSIONS
(cd out && sha256sum LICENSE.* VERSIONS *.js *.css > SHA256SUMS)

if [ "${1:-}" = "--check" ]; then
    diff -r "$work/out" "$vendor" && echo "vendor files match $MARKED $DOMPURIFY $HIGHLIGHT"
else
    mkdir -p "$vendor"
    cp out/* "$vendor/"
    echo "wrote $vendor:"
    cat "$vendor/SHA256SUMS"
fi
