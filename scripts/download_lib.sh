# Helpers for the download scripts (sourced, not run).
# Google Drive files of the NeRF release (https://drive.google.com/drive/folders/128yBriW1IG_3NJ5Rp7APSTZsJqdJdfc1).

die() { echo "error: $*" >&2; exit 1; }

python_bin() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"
  elif [ -x .venv/bin/python ]; then echo .venv/bin/python
  else echo python3; fi
}

# fetch URL OUT: download to OUT.partial, check it is a zip archive, then move to OUT.
fetch_zip() {
  local url=$1 out=$2
  command -v curl >/dev/null || die "curl is needed to download $url"
  command -v unzip >/dev/null || die "unzip is needed to unpack $out"
  echo "downloading $url"
  echo "        to $out"
  curl -fL --retry 3 --progress-bar -o "$out.partial" "$url" \
    || { rm -f "$out.partial"; die "download of $url failed; fetch it by hand into $out and run this script again"; }
  unzip -tqq "$out.partial" >/dev/null 2>&1 \
    || { rm -f "$out.partial"; die "$url did not give a valid zip archive (Google Drive may be rate-limiting: try again later, or fetch it by hand into $out)"; }
  mv "$out.partial" "$out"
}

# unpack ZIP DEST_PARENT NAME: unzip into a temporary folder, then move NAME into DEST_PARENT.
unpack_zip() {
  local zip=$1 parent=$2 name=$3 tmp
  tmp=$(mktemp -d "$parent/.unpack.XXXXXX")
  unzip -q "$zip" -d "$tmp" || { rm -rf "$tmp"; die "could not unpack $zip"; }
  [ -d "$tmp/$name" ] || { rm -rf "$tmp"; die "$zip does not hold a folder $name"; }
  rm -rf "${parent:?}/$name"
  mv "$tmp/$name" "$parent/$name"
  rm -rf "$tmp"
}

BLENDER_SCENES="chair drums ficus hotdog lego materials mic ship"
LLFF_SCENES="fern flower fortress horns leaves orchids room trex"

# Each check prints the first problem and returns 1, or returns 0 when the layout is complete.
check_blender() {
  local root=$1 s f
  for s in $BLENDER_SCENES; do
    for f in transforms_train.json transforms_val.json transforms_test.json; do
      [ -f "$root/$s/$f" ] || { echo "missing $root/$s/$f"; return 1; }
    done
    [ -f "$root/$s/train/r_0.png" ] || { echo "missing $root/$s/train/r_0.png"; return 1; }
  done
}

check_llff() {
  local root=$1 s d
  for s in $LLFF_SCENES; do
    [ -f "$root/$s/poses_bounds.npy" ] || { echo "missing $root/$s/poses_bounds.npy"; return 1; }
    for d in images images_4 images_8; do
      [ -d "$root/$s/$d" ] || { echo "missing $root/$s/$d/"; return 1; }
    done
  done
}

check_multicam() {
  local root=$1 s
  for s in $BLENDER_SCENES; do
    [ -f "$root/$s/metadata.json" ] || { echo "missing $root/$s/metadata.json"; return 1; }
  done
}

# download_dataset DATA_DIR NAME URL CHECK LABEL SCENES: fetch DATA_DIR/NAME.zip from URL unless
# CHECK passes on DATA_DIR/NAME already, unpack it, check the layout, remove the archive.
download_dataset() {
  local data_dir=$1 name=$2 url=$3 check=$4 label=$5 scenes=$6 problem
  mkdir -p "$data_dir"
  if "$check" "$data_dir/$name" >/dev/null; then
    echo "$label already in $data_dir/$name"; return 0
  fi
  [ -f "$data_dir/$name.zip" ] || fetch_zip "$url" "$data_dir/$name.zip"
  unpack_zip "$data_dir/$name.zip" "$data_dir" "$name"
  problem=$("$check" "$data_dir/$name") || die "unpacked, but the layout is incomplete: $problem"
  rm -f "$data_dir/$name.zip"
  echo "$label are in $data_dir/$name ($scenes)"
}
