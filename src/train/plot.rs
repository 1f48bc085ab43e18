//! Loss curves as PNG, with no plotting dependency: a small RGB raster, a
//! 3×5 digit font for the tick labels, and a PNG writer that stores the
//! image in uncompressed deflate blocks (valid PNG, larger files; a few
//! hundred KiB for a loss curve is not worth an image crate).
//!
//! Series are drawn in [`COLORS`] order over a shared axis: x is the
//! iteration, y the loss (linear), with five labelled ticks per axis.

use std::path::Path;

use crate::{Error, Result};

/// Series colours, in order (name, RGB).
pub const COLORS: [(&str, [u8; 3]); 6] = [
    ("blue", [31, 119, 180]),
    ("orange", [255, 127, 14]),
    ("green", [44, 160, 44]),
    ("red", [214, 39, 40]),
    ("purple", [148, 103, 189]),
    ("brown", [140, 86, 75]),
];

const W: usize = 720;
const H: usize = 405;
const LEFT: usize = 56;
const RIGHT: usize = 28;
const TOP: usize = 16;
const BOTTOM: usize = 32;

/// 3×5 glyphs for `0-9 . - e`, one row per 3-bit number (MSB left).
fn glyph(c: char) -> Option<[u8; 5]> {
    Some(match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        'e' => [0, 7, 7, 4, 7],
        _ => return None,
    })
}

/// An RGB image.
pub struct Canvas {
    pixels: Vec<u8>,
}

impl Default for Canvas {
    fn default() -> Self {
        Canvas { pixels: vec![255; W * H * 3] }
    }
}

impl Canvas {
    fn set(&mut self, x: i64, y: i64, rgb: [u8; 3]) {
        if (0..W as i64).contains(&x) && (0..H as i64).contains(&y) {
            let i = (y as usize * W + x as usize) * 3;
            self.pixels[i..i + 3].copy_from_slice(&rgb);
        }
    }

    /// The colour at `(x, y)`.
    pub fn get(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * W + x) * 3;
        [self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]]
    }

    /// A line (Bresenham), `width` pixels thick.
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), rgb: [u8; 3], width: i64) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            for o in 0..width {
                self.set(x, y + o, rgb);
            }
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Text in the 3×5 font scaled by 2, top-left at `(x, y)`.
    fn text(&mut self, x: i64, y: i64, s: &str, rgb: [u8; 3]) {
        for (k, c) in s.chars().enumerate() {
            let Some(g) = glyph(c) else { continue };
            for (row, bits) in g.iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        for (ox, oy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                            self.set(x + k as i64 * 8 + col * 2 + ox, y + row as i64 * 2 + oy, rgb);
                        }
                    }
                }
            }
        }
    }
}

fn tick_label(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e5 || v.abs() < 1e-2) {
        format!("{v:.1e}")
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Draws the series (each a list of `(iteration, loss)`; non-finite points
/// are skipped) on shared axes.
pub fn draw(series: &[Vec<(f64, f64)>]) -> Canvas {
    let mut c = Canvas::default();
    let pts = || series.iter().flatten().filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts() {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    y0 = y0.min(0.0);
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    if y1 - y0 < 1e-12 {
        y1 = y0 + 1.0;
    }
    let (pw, ph) = ((W - LEFT - RIGHT) as f64, (H - TOP - BOTTOM) as f64);
    let px = |x: f64| (LEFT as f64 + (x - x0) / (x1 - x0) * pw).round() as i64;
    let py = |y: f64| (TOP as f64 + (1.0 - (y - y0) / (y1 - y0)) * ph).round() as i64;
    let (grey, black) = ([225, 225, 225], [0, 0, 0]);
    for k in 0..=4 {
        let f = k as f64 / 4.0;
        let (gx, gy) = (px(x0 + f * (x1 - x0)), py(y0 + f * (y1 - y0)));
        c.line((gx, TOP as i64), (gx, (H - BOTTOM) as i64), grey, 1);
        c.line((LEFT as i64, gy), ((W - RIGHT) as i64, gy), grey, 1);
        let xl = tick_label(x0 + f * (x1 - x0));
        c.text(gx - 4 * xl.len() as i64, (H - BOTTOM + 8) as i64, &xl, black);
        let yl = tick_label(y0 + f * (y1 - y0));
        c.text(LEFT as i64 - 6 - 8 * yl.len() as i64, gy - 5, &yl, black);
    }
    c.line((LEFT as i64, TOP as i64), (LEFT as i64, (H - BOTTOM) as i64), black, 1);
    c.line((LEFT as i64, (H - BOTTOM) as i64), ((W - RIGHT) as i64, (H - BOTTOM) as i64), black, 1);
    for (s, points) in series.iter().enumerate() {
        let rgb = COLORS[s % COLORS.len()].1;
        let mut last: Option<(i64, i64)> = None;
        for &(x, y) in points.iter().filter(|(x, y)| x.is_finite() && y.is_finite()) {
            let p = (px(x), py(y));
            if let Some(q) = last {
                c.line(q, p, rgb, 2);
            }
            last = Some(p);
        }
    }
    c
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

impl Canvas {
    /// The image as PNG bytes (8-bit RGB, zlib stream of stored blocks).
    pub fn png(&self) -> Vec<u8> {
        let mut raw = Vec::with_capacity(H * (W * 3 + 1));
        for row in self.pixels.chunks_exact(W * 3) {
            raw.push(0); // filter: none
            raw.extend_from_slice(row);
        }
        let mut z = vec![0x78, 0x01];
        let blocks: Vec<&[u8]> = raw.chunks(65_535).collect();
        for (i, block) in blocks.iter().enumerate() {
            z.push((i + 1 == blocks.len()) as u8);
            let len = block.len() as u16;
            z.extend_from_slice(&len.to_le_bytes());
            z.extend_from_slice(&(!len).to_le_bytes());
            z.extend_from_slice(block);
        }
        let (mut a, mut b) = (1u32, 0u32);
        for &v in &raw {
            a = (a + v as u32) % 65_521;
            b = (b + a) % 65_521;
        }
        z.extend_from_slice(&((b << 16) | a).to_be_bytes());
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&(W as u32).to_be_bytes());
        ihdr.extend_from_slice(&(H as u32).to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        chunk(&mut out, b"IHDR", &ihdr);
        chunk(&mut out, b"IDAT", &z);
        chunk(&mut out, b"IEND", &[]);
        out
    }
}

/// Draws `series` and writes the PNG atomically.
pub fn write_loss_png(path: &Path, series: &[Vec<(f64, f64)>]) -> Result<()> {
    if series.is_empty() {
        return Err(Error::invalid("loss plot", "no series to draw"));
    }
    crate::peft::write_atomic(path, &draw(series).png())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_is_well_formed_and_curves_are_drawn_in_their_colours() {
        let series = vec![vec![(0.0, 5.0), (50.0, 2.0), (100.0, 1.0)], vec![(0.0, 4.0), (100.0, 4.0)]];
        let canvas = draw(&series);
        let png = canvas.png();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        // Every chunk's CRC checks out, and the stored blocks hold the rows.
        let mut pos = 8;
        let mut kinds = Vec::new();
        while pos < png.len() {
            let len = u32::from_be_bytes(png[pos..pos + 4].try_into().unwrap()) as usize;
            let body = &png[pos + 4..pos + 8 + len];
            let crc = u32::from_be_bytes(png[pos + 8 + len..pos + 12 + len].try_into().unwrap());
            assert_eq!(crc32(body), crc, "chunk {:?}", std::str::from_utf8(&body[..4]));
            kinds.push(body[..4].to_vec());
            pos += 12 + len;
        }
        assert_eq!(kinds, vec![b"IHDR".to_vec(), b"IDAT".to_vec(), b"IEND".to_vec()]);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926, "CRC-32 check value");
        // The flat second series (y = 4) crosses the middle in orange.
        let y4 = (TOP as f64 + (1.0 - 4.0 / 5.0) * (H - TOP - BOTTOM) as f64).round() as usize;
        assert_eq!(canvas.get(W / 2, y4), COLORS[1].1);
        // The first series starts at the top-left corner of the plot, in blue.
        assert_eq!(canvas.get(LEFT, TOP), COLORS[0].1);
    }
}
