//! The IDX file format (the one MNIST and Fashion-MNIST ship in), raw or gzip-compressed.
//!
//! An IDX file is a 4-byte magic number `00 00 TT NN` (`TT` the element type, `NN` the
//! number of dimensions), `NN` big-endian `u32` dimension sizes, then the elements in
//! row-major order. Only unsigned bytes (`TT = 0x08`) are supported: that is what image
//! and label files hold. Every problem with a file (missing, truncated, not IDX, wrong
//! type or rank, trailing data, corrupt gzip) is a `dlc::data` [`Diag`] naming the file;
//! nothing here panics on bad input.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::Path;

use flate2::Compression;
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;

use crate::diagnostics::{Diag, thousands};

/// The diagnostic code of every data-loading problem.
pub const CODE: &str = "dlc::data";

/// IDX element type of unsigned bytes.
const TYPE_U8: u8 = 0x08;

/// Largest payload accepted (4 GiB): a guard against absurd headers in corrupt files.
const MAX_ELEMENTS: usize = 1 << 32;

/// Images read from an IDX file of rank 3: `count` images of `rows × cols` bytes, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxImages {
    /// `count * rows * cols` pixel values, image after image, each row-major.
    pub pixels: Vec<u8>,
    /// Number of images.
    pub count: usize,
    /// Height of each image.
    pub rows: usize,
    /// Width of each image.
    pub cols: usize,
}

/// Reads an image file: an IDX file of unsigned bytes with 3 dimensions (count, rows, cols).
pub fn read_images(path: &Path) -> Result<IdxImages, Diag> {
    let (dims, pixels) = read_u8(path, 3, "an image file (count, rows, cols)")?;
    let (count, rows, cols) = (dims[0], dims[1], dims[2]);
    if rows == 0 || cols == 0 {
        return Err(Diag::new(
            CODE,
            format!(
                "`{}` declares images of {rows}×{cols} pixels; expected both sides to be at least 1",
                path.display()
            ),
        )
        .help("the file header is corrupt; fetch the file again"));
    }
    Ok(IdxImages {
        pixels,
        count,
        rows,
        cols,
    })
}

/// Reads a label file: an IDX file of unsigned bytes with 1 dimension (count).
pub fn read_labels(path: &Path) -> Result<Vec<u8>, Diag> {
    Ok(read_u8(path, 1, "a label file (count)")?.1)
}

/// Reads an IDX file of unsigned bytes with `rank` dimensions (`what` describes it for
/// messages); returns the dimensions and the elements. Gzip is detected by content.
pub fn read_u8(path: &Path, rank: usize, what: &str) -> Result<(Vec<usize>, Vec<u8>), Diag> {
    let name = path.display();
    let bytes = std::fs::read(path).map_err(|e| {
        let help = if e.kind() == io::ErrorKind::NotFound {
            "check the path; Fashion-MNIST's files are `train-images-idx3-ubyte.gz`, \
             `train-labels-idx1-ubyte.gz`, `t10k-images-idx3-ubyte.gz` and \
             `t10k-labels-idx1-ubyte.gz` (raw, without `.gz`, also works)"
        } else {
            "check that the file exists and is readable"
        };
        Diag::new(CODE, format!("cannot read `{name}`: {e}")).help(help)
    })?;
    let gz = bytes.starts_with(&[0x1f, 0x8b]);
    let compressed_len = bytes.len();
    let mut reader: Box<dyn Read + '_> = if gz {
        Box::new(MultiGzDecoder::new(&bytes[..]))
    } else {
        Box::new(&bytes[..])
    };
    let stream_err = |e: io::Error| -> Diag {
        if gz {
            Diag::new(CODE, format!("`{name}` is not a valid gzip file: {e}"))
                .help("the file is corrupt or an incomplete download; fetch it again")
        } else {
            Diag::new(CODE, format!("cannot read `{name}`: {e}"))
        }
    };

    // Magic number.
    let mut magic = [0u8; 4];
    let got = read_full(&mut reader, &mut magic).map_err(stream_err)?;
    let expected_magic = [0, 0, TYPE_U8, rank as u8];
    if got < 4 {
        return Err(Diag::new(
            CODE,
            format!(
                "`{name}` is truncated: it holds {got} byte{} of data; an IDX file starts with a \
                 4-byte magic number",
                if got == 1 { "" } else { "s" }
            ),
        )
        .help("the file is empty or an incomplete download; fetch it again"));
    }
    if magic[0] != 0 || magic[1] != 0 {
        return Err(Diag::new(
            CODE,
            format!(
                "`{name}` is not an IDX file: it starts with bytes {}, expected {} (the IDX \
                 magic number of {what})",
                hex(&magic),
                hex(&expected_magic)
            ),
        )
        .help(
            "point at the MNIST-format files (`*-idx3-ubyte`, `*-idx1-ubyte`, optionally gzipped)",
        ));
    }
    if magic[2] != TYPE_U8 {
        return Err(Diag::new(
            CODE,
            format!(
                "`{name}` holds IDX elements of type 0x{:02X} ({}); expected 0x08 (unsigned bytes)",
                magic[2],
                type_name(magic[2])
            ),
        )
        .help("only unsigned-byte IDX files (images and labels) are supported"));
    }
    let ndims = magic[3] as usize;
    if ndims != rank {
        return Err(Diag::new(
            CODE,
            format!(
                "`{name}` has {ndims} dimension{}; expected {rank} for {what}",
                if ndims == 1 { "" } else { "s" }
            ),
        )
        .help("check that image and label files are not swapped"));
    }

    // Dimensions.
    let mut header = vec![0u8; 4 * ndims];
    let got = read_full(&mut reader, &mut header).map_err(stream_err)?;
    if got < header.len() {
        return Err(Diag::new(
            CODE,
            format!(
                "`{name}` is truncated: its header declares {ndims} dimensions ({} bytes) but \
                 only {got} bytes follow the magic number",
                4 * ndims
            ),
        )
        .help("the file is an incomplete download; fetch it again"));
    }
    let dims: Vec<usize> = header
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let shape = dims
        .iter()
        .map(|d| thousands(*d as u64))
        .collect::<Vec<_>>()
        .join("×");
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= MAX_ELEMENTS)
        .ok_or_else(|| {
            Diag::new(
                CODE,
                format!("`{name}` declares an implausibly large array of {shape} bytes"),
            )
            .help("the file header is corrupt; fetch the file again")
        })?;

    // Payload: read at most one byte more than declared, growing as data arrives (a corrupt
    // header cannot make us allocate more than the file can actually deliver).
    let header_len = 4 + 4 * ndims;
    let mut data = Vec::new();
    if !gz {
        data.reserve_exact(expected.min(compressed_len.saturating_sub(header_len)));
    } else {
        data.reserve(expected.min(compressed_len.saturating_mul(8)));
    }
    let read = reader
        .by_ref()
        .take(expected as u64 + 1)
        .read_to_end(&mut data);
    if let Err(e) = read {
        return Err(if gz && e.kind() == io::ErrorKind::UnexpectedEof {
            let detail = if data.len() >= expected {
                "the gzip stream ends before its checksum, after all the data".to_string()
            } else {
                format!(
                    "the gzip stream ends after {} of the {} data bytes its header declares{}",
                    thousands(data.len() as u64),
                    thousands(expected as u64),
                    if ndims > 1 {
                        format!(" ({shape})")
                    } else {
                        String::new()
                    }
                )
            };
            Diag::new(CODE, format!("`{name}` is truncated: {detail}"))
                .help("the file is an incomplete download; fetch it again")
        } else {
            stream_err(e)
        });
    }
    if data.len() != expected {
        let found = if data.len() > expected {
            let rest = io::copy(&mut reader, &mut io::sink()).map_err(stream_err)?;
            data.len() as u64 + rest
        } else {
            data.len() as u64
        };
        let (what_happened, help) = if found < expected as u64 {
            (
                "is truncated",
                "the file is an incomplete download; fetch it again",
            )
        } else {
            (
                "is longer than its header says",
                "the file is corrupt (or the header is); fetch it again",
            )
        };
        return Err(Diag::new(
            CODE,
            format!(
                "`{name}` {what_happened}: its header declares {shape} = {} data bytes \
                 ({} bytes{} in all) but it holds {} data bytes",
                thousands(expected as u64),
                thousands((expected + header_len) as u64),
                if gz { " uncompressed" } else { "" },
                thousands(found)
            ),
        )
        .help(help));
    }
    Ok((dims, data))
}

/// Writes an IDX file of unsigned bytes with dimensions `dims`; gzip-compressed (best
/// compression, no timestamp: the output is reproducible) when the path ends in `.gz`.
pub fn write_u8(path: &Path, dims: &[usize], data: &[u8]) -> Result<(), Diag> {
    let name = path.display();
    let expected = dims.iter().product::<usize>();
    if dims.len() > 255 || data.len() != expected || dims.iter().any(|&d| d > u32::MAX as usize) {
        return Err(Diag::new(
            CODE,
            format!(
                "cannot write `{name}`: {} bytes do not form an IDX array of dimensions {dims:?}",
                data.len()
            ),
        ));
    }
    let io_err = |e: io::Error| Diag::new(CODE, format!("cannot write `{name}`: {e}"));
    let file = BufWriter::new(File::create(path).map_err(io_err)?);
    let mut header = vec![0, 0, TYPE_U8, dims.len() as u8];
    for &d in dims {
        header.extend_from_slice(&(d as u32).to_be_bytes());
    }
    let gz = path.extension().is_some_and(|e| e == "gz");
    if gz {
        let mut enc = GzEncoder::new(file, Compression::best());
        enc.write_all(&header).map_err(io_err)?;
        enc.write_all(data).map_err(io_err)?;
        enc.finish().map_err(io_err)?.flush().map_err(io_err)?;
    } else {
        let mut file = file;
        file.write_all(&header).map_err(io_err)?;
        file.write_all(data).map_err(io_err)?;
        file.flush().map_err(io_err)?;
    }
    Ok(())
}

/// Writes images (`pixels.len() == count * rows * cols`) as a rank-3 IDX file.
pub fn write_images(
    path: &Path,
    pixels: &[u8],
    count: usize,
    rows: usize,
    cols: usize,
) -> Result<(), Diag> {
    write_u8(path, &[count, rows, cols], pixels)
}

/// Writes labels as a rank-1 IDX file.
pub fn write_labels(path: &Path, labels: &[u8]) -> Result<(), Diag> {
    write_u8(path, &[labels.len()], labels)
}

/// Reads until `buf` is full or the stream ends; returns how many bytes were read.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn type_name(t: u8) -> &'static str {
    match t {
        0x08 => "unsigned byte",
        0x09 => "signed byte",
        0x0B => "16-bit integer",
        0x0C => "32-bit integer",
        0x0D => "32-bit float",
        0x0E => "64-bit float",
        _ => "not an IDX type",
    }
}
