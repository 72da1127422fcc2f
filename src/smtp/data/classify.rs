//! SIMD classification of 64-octet blocks for the DATA scanner ([`super::DataReceiver`]).
//!
//! This module owns two things and nothing else:
//!
//! - turning a 64-octet block into bitmasks of the octets the DATA rules look at ([`Masks`]:
//!   CR, LF, `.` and NUL; bit `i` is octet `i`), and
//! - [`take_blocks`]: classifying consecutive blocks, offering each block's masks to the
//!   caller's [`BlockRule`], appending the blocks the rule takes to the output buffer and noting
//!   whether any taken block had an octet with the high bit set.
//!
//! What makes a block acceptable (lines, dot-stuffing, limits) is the caller's business; this
//! module knows nothing about SMTP.
//!
//! Implementations: AVX-512BW (one compare per class into a mask register) and AVX2 (two
//! 32-octet halves, compare + `movemask`), chosen at run time with `is_x86_feature_detected!`.
//! [`classify_scalar`] is the plain definition both are tested against. On other
//! architectures, or x86-64 CPUs without AVX2, [`Simd::detect`] returns `None` and the caller
//! keeps to its scalar path.
//!
//! How [`take_blocks`] stays fast: the block loaded for classifying is the one stored into the
//! output (no second pass, no `memcpy` call per block); the 8-bit check ORs the taken blocks
//! together and looks at the high bits once per run; and NUL, which mail all but never has, is
//! not classified per block: a window of blocks is first done with an always-empty NUL mask
//! while taking the octet-wise minimum, and done again with exact masks only if that minimum
//! shows a NUL among the blocks offered.
//!
//! All of the DATA scanner's `unsafe` is here: calling `#[target_feature]` functions (sound
//! because a [`Simd`] value can only be made after its CPU features were detected), unaligned
//! SIMD loads from blocks inside the input, stores into output capacity reserved just before,
//! and `Vec::set_len` over exactly the octets stored.

#![warn(unsafe_op_in_unsafe_fn)]

/// Octets per block: one bit per octet in a `u64`.
pub(super) const BLOCK: usize = 64;

/// Which octets of one block are of interest; bit `i` stands for octet `i` of the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Masks {
    /// `\r`
    pub cr: u64,
    /// `\n`
    pub lf: u64,
    /// `.`
    pub dot: u64,
    /// NUL
    pub nul: u64,
}

/// The definition of [`Masks`], one octet at a time (the reference for the SIMD versions).
#[cfg_attr(not(test), allow(dead_code))]
pub(super) fn classify_scalar(block: &[u8; BLOCK]) -> Masks {
    let mut m = Masks::default();
    for (i, &b) in block.iter().enumerate() {
        let bit = 1u64 << i;
        match b {
            b'\r' => m.cr |= bit,
            b'\n' => m.lf |= bit,
            b'.' => m.dot |= bit,
            0 => m.nul |= bit,
            _ => {}
        }
    }
    m
}

/// The caller's verdict on each block [`take_blocks`] classifies.
pub(super) trait BlockRule: Copy {
    /// Whether the block with these masks is taken as it is. Called for consecutive blocks in
    /// order; a rule that takes a block updates its own state as if it had scanned the block.
    /// The first block refused ends the run (and must leave the rule's state unchanged). The
    /// rule is `Copy` so the run can keep it in registers.
    fn take(&mut self, m: Masks) -> bool;
}

/// What [`take_blocks`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Run {
    /// Octets taken (a multiple of [`BLOCK`]) from the start of the input, now appended to the
    /// output.
    pub len: usize,
    /// Whether any taken octet has the high bit set.
    pub eight_bit: bool,
    /// The masks of the block the rule refused (the one at `len`), if the run ended that way
    /// rather than at the end of the input or of `max_blocks`.
    pub refused: Option<Masks>,
}

/// A SIMD instruction set this CPU has been checked to support.
///
/// The field is private: the only way to get a value is [`Simd::detect`] (or, in tests,
/// `Simd::available`), which is what makes calling the `#[target_feature]` code sound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Simd(Isa);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Simd {
    /// The best instruction set available: AVX-512BW, else AVX2, else `None`. The standard
    /// library caches the CPU check, so this is a couple of loads; call it once per `feed`.
    #[inline]
    pub(super) fn detect() -> Option<Simd> {
        #[cfg(target_arch = "x86_64")]
        {
            if has_avx512() {
                return Some(Simd(Isa::Avx512));
            }
            if has_avx2() {
                return Some(Simd(Isa::Avx2));
            }
        }
        None
    }

    /// Every instruction set this CPU supports, so tests can check each one.
    #[cfg(test)]
    pub(super) fn available() -> Vec<Simd> {
        #[allow(unused_mut)]
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if has_avx512() {
                v.push(Simd(Isa::Avx512));
            }
            if has_avx2() {
                v.push(Simd(Isa::Avx2));
            }
        }
        v
    }

    /// Classifies one block (tests compare this with [`classify_scalar`]).
    #[cfg(test)]
    pub(super) fn classify(self, block: &[u8; BLOCK]) -> Masks {
        match self.0 {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a `Simd` holding `Avx512` exists only once `has_avx512()` was true.
            Isa::Avx512 => unsafe { x86::classify_avx512(block) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a `Simd` holding `Avx2` exists only once `has_avx2()` was true.
            Isa::Avx2 => unsafe { x86::classify_avx2(block) },
        }
    }
}

/// What [`x86::take_avx512`] is compiled for.
#[cfg(target_arch = "x86_64")]
#[inline]
fn has_avx512() -> bool {
    is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("bmi1")
        && is_x86_feature_detected!("bmi2")
        && is_x86_feature_detected!("lzcnt")
}

/// What [`x86::take_avx2`] is compiled for.
#[cfg(target_arch = "x86_64")]
#[inline]
fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("bmi1")
        && is_x86_feature_detected!("bmi2")
        && is_x86_feature_detected!("lzcnt")
}

/// Classifies the consecutive blocks of `input` from its start (at most `max_blocks` of them,
/// never a partial one), offering each block's masks to `rule` in order, and appends every
/// block `rule` takes to `out`. Stops at the first block refused, whose masks it returns.
pub(super) fn take_blocks<R: BlockRule>(
    simd: Simd,
    input: &[u8],
    max_blocks: usize,
    rule: &mut R,
    out: &mut Vec<u8>,
) -> Run {
    match simd.0 {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a `Simd` holding `Avx512` exists only once `has_avx512()` was true.
        Isa::Avx512 => unsafe { x86::take_avx512(input, max_blocks, rule, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a `Simd` holding `Avx2` exists only once `has_avx2()` was true.
        Isa::Avx2 => unsafe { x86::take_avx2(input, max_blocks, rule, out) },
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{BlockRule, Masks, Run, BLOCK};

    /// Blocks [`take`] appends between two reservations of the output buffer: the most it
    /// reserves beyond what a run turns out to need is this many blocks (4 KiB).
    const WINDOW: usize = 64;

    /// One 64-octet block in SIMD registers.
    ///
    /// # Safety
    ///
    /// Every method needs the CPU features of its implementation, and the pointers given to
    /// `load` and `store` must be valid for 64 octets.
    trait Lanes: Copy {
        /// All octets 0.
        unsafe fn zero() -> Self;
        /// All octets 0xff.
        unsafe fn ones() -> Self;
        unsafe fn load(src: *const u8) -> Self;
        unsafe fn store(self, dst: *mut u8);
        /// The block's masks; `nul` is left 0 unless `NUL`.
        unsafe fn masks<const NUL: bool>(self) -> Masks;
        unsafe fn or(self, other: Self) -> Self;
        /// Octet-wise unsigned minimum.
        unsafe fn min(self, other: Self) -> Self;
        /// Whether any octet has the high bit set.
        unsafe fn any_high(self) -> bool;
        /// Whether any octet is 0.
        unsafe fn any_zero(self) -> bool;
    }

    /// AVX-512BW: the block is one register; each class is one compare into a mask register.
    #[derive(Clone, Copy)]
    struct Avx512(__m512i);

    // SAFETY (every method): the caller guarantees AVX-512BW, and for `load`/`store` 64
    // readable/writable octets (unaligned access is fine).
    impl Lanes for Avx512 {
        #[inline(always)]
        unsafe fn zero() -> Self {
            Avx512(unsafe { _mm512_setzero_si512() })
        }

        #[inline(always)]
        unsafe fn ones() -> Self {
            Avx512(unsafe { _mm512_set1_epi8(-1) })
        }

        #[inline(always)]
        unsafe fn load(src: *const u8) -> Self {
            Avx512(unsafe { _mm512_loadu_si512(src.cast()) })
        }

        #[inline(always)]
        unsafe fn store(self, dst: *mut u8) {
            unsafe { _mm512_storeu_si512(dst.cast(), self.0) }
        }

        #[inline(always)]
        unsafe fn masks<const NUL: bool>(self) -> Masks {
            let eq = |c: u8| unsafe { _mm512_cmpeq_epi8_mask(self.0, _mm512_set1_epi8(c as i8)) };
            Masks {
                cr: eq(b'\r'),
                lf: eq(b'\n'),
                dot: eq(b'.'),
                nul: if NUL {
                    unsafe { _mm512_testn_epi8_mask(self.0, self.0) }
                } else {
                    0
                },
            }
        }

        #[inline(always)]
        unsafe fn or(self, other: Self) -> Self {
            Avx512(unsafe { _mm512_or_si512(self.0, other.0) })
        }

        #[inline(always)]
        unsafe fn min(self, other: Self) -> Self {
            Avx512(unsafe { _mm512_min_epu8(self.0, other.0) })
        }

        #[inline(always)]
        unsafe fn any_high(self) -> bool {
            unsafe { _mm512_movepi8_mask(self.0) != 0 }
        }

        #[inline(always)]
        unsafe fn any_zero(self) -> bool {
            unsafe { _mm512_testn_epi8_mask(self.0, self.0) != 0 }
        }
    }

    /// AVX2: the block is two 32-octet registers; each class is a compare and a `movemask`
    /// per half.
    #[derive(Clone, Copy)]
    struct Avx2(__m256i, __m256i);

    /// The bits of the octets equal to `c` in one 32-octet half.
    ///
    /// # Safety
    ///
    /// The CPU must support AVX2.
    #[inline(always)]
    unsafe fn eq_avx2(v: __m256i, c: u8) -> u64 {
        // SAFETY: the caller guarantees AVX2. `movemask` gives one bit per octet in an i32;
        // `as u32` keeps those 32 bits without sign extension.
        u64::from(unsafe { _mm256_movemask_epi8(_mm256_cmpeq_epi8(v, _mm256_set1_epi8(c as i8))) } as u32)
    }

    // SAFETY (every method): the caller guarantees AVX2, and for `load`/`store` 64
    // readable/writable octets (each access is 32 of them, unaligned).
    impl Lanes for Avx2 {
        #[inline(always)]
        unsafe fn zero() -> Self {
            unsafe { Avx2(_mm256_setzero_si256(), _mm256_setzero_si256()) }
        }

        #[inline(always)]
        unsafe fn ones() -> Self {
            unsafe { Avx2(_mm256_set1_epi8(-1), _mm256_set1_epi8(-1)) }
        }

        #[inline(always)]
        unsafe fn load(src: *const u8) -> Self {
            unsafe { Avx2(_mm256_loadu_si256(src.cast()), _mm256_loadu_si256(src.add(32).cast())) }
        }

        #[inline(always)]
        unsafe fn store(self, dst: *mut u8) {
            unsafe {
                _mm256_storeu_si256(dst.cast(), self.0);
                _mm256_storeu_si256(dst.add(32).cast(), self.1);
            }
        }

        #[inline(always)]
        unsafe fn masks<const NUL: bool>(self) -> Masks {
            let both = |c| unsafe { eq_avx2(self.0, c) | eq_avx2(self.1, c) << 32 };
            Masks {
                cr: both(b'\r'),
                lf: both(b'\n'),
                dot: both(b'.'),
                nul: if NUL { both(0) } else { 0 },
            }
        }

        #[inline(always)]
        unsafe fn or(self, other: Self) -> Self {
            unsafe { Avx2(_mm256_or_si256(self.0, other.0), _mm256_or_si256(self.1, other.1)) }
        }

        #[inline(always)]
        unsafe fn min(self, other: Self) -> Self {
            unsafe { Avx2(_mm256_min_epu8(self.0, other.0), _mm256_min_epu8(self.1, other.1)) }
        }

        #[inline(always)]
        unsafe fn any_high(self) -> bool {
            unsafe { _mm256_movemask_epi8(_mm256_or_si256(self.0, self.1)) != 0 }
        }

        #[inline(always)]
        unsafe fn any_zero(self) -> bool {
            unsafe {
                let low = _mm256_min_epu8(self.0, self.1);
                _mm256_movemask_epi8(_mm256_cmpeq_epi8(low, _mm256_setzero_si256())) != 0
            }
        }
    }

    /// What one [`pass`] did.
    struct Pass<L> {
        /// Blocks taken.
        taken: usize,
        /// The OR of the blocks taken (for the 8-bit check).
        high: L,
        /// The masks of the block refused, if one was.
        refused: Option<Masks>,
        /// Without `NUL`: whether any block offered (the refused one too) had a NUL octet. The
        /// masks' `nul` was left 0, which is only true if this is false.
        saw_nul: bool,
    }

    /// One pass over `blocks` blocks from `src`: offers each to `rule`, stores each taken one
    /// at `dst`. With `NUL` the masks are exact; without, their `nul` is left 0 and the pass
    /// notes whether that was wrong.
    ///
    /// # Safety
    ///
    /// The CPU must support `L`'s features, `src` must be readable and `dst` writable for
    /// `blocks * 64` octets.
    #[inline(always)]
    unsafe fn pass<L: Lanes, R: BlockRule, const NUL: bool>(
        src: *const u8,
        dst: *mut u8,
        blocks: usize,
        rule: &mut R,
    ) -> Pass<L> {
        // SAFETY (all `Lanes` calls): the caller guarantees the features; every load and store
        // is at block `k < blocks`, inside what the caller guarantees.
        unsafe {
            let mut high = L::zero();
            let mut low = L::ones();
            let mut refused = None;
            let mut k = 0;
            // Two blocks a step (the second's minimum counts even if the first is refused,
            // which at worst makes a pass be done again for nothing).
            'run: {
                while k + 2 <= blocks {
                    let pair = [L::load(src.add(k * BLOCK)), L::load(src.add((k + 1) * BLOCK))];
                    if !NUL {
                        low = low.min(pair[0].min(pair[1]));
                    }
                    for v in pair {
                        let m = v.masks::<NUL>();
                        if !rule.take(m) {
                            refused = Some(m);
                            break 'run;
                        }
                        high = high.or(v);
                        v.store(dst.add(k * BLOCK));
                        k += 1;
                    }
                }
                if k < blocks {
                    let v = L::load(src.add(k * BLOCK));
                    if !NUL {
                        low = low.min(v);
                    }
                    let m = v.masks::<NUL>();
                    if rule.take(m) {
                        high = high.or(v);
                        v.store(dst.add(k * BLOCK));
                        k += 1;
                    } else {
                        refused = Some(m);
                    }
                }
            }
            Pass {
                taken: k,
                high,
                refused,
                saw_nul: !NUL && low.any_zero(),
            }
        }
    }

    /// [`super::take_blocks`] for one implementation of [`Lanes`]. The rule works on a copy
    /// kept in registers (written back at the end), the output grows one window at a time, the
    /// block already loaded for classifying is what is stored into the output, and the 8-bit
    /// check ORs the taken blocks together, looking at the high bits once at the end.
    ///
    /// NUL octets are all but absent from mail, so each window of blocks is first classified
    /// without a NUL mask, taking the minimum of the octets on the way; only when a block
    /// offered had a NUL is the window done again, from the same state, with exact masks.
    ///
    /// # Safety
    ///
    /// The CPU must support `L`'s features.
    #[inline(always)]
    unsafe fn take<L: Lanes, R: BlockRule>(input: &[u8], max_blocks: usize, rule: &mut R, out: &mut Vec<u8>) -> Run {
        let blocks = (input.len() / BLOCK).min(max_blocks);
        let mut r = *rule;
        // SAFETY: the caller guarantees the features.
        let mut high = unsafe { L::zero() };
        let mut taken = 0;
        let mut refused = None;
        while taken < blocks {
            let window = (blocks - taken).min(WINDOW);
            out.reserve(window * BLOCK);
            let dst = out.spare_capacity_mut().as_mut_ptr().cast::<u8>();
            // SAFETY: `taken + window <= blocks <= input.len() / 64`, so the window's blocks
            // are inside `input`; `window * 64` octets of spare capacity were just reserved.
            let p = unsafe {
                let src = input.as_ptr().add(taken * BLOCK);
                let before = r;
                let p = pass::<L, R, false>(src, dst, window, &mut r);
                if p.saw_nul {
                    r = before;
                    pass::<L, R, true>(src, dst, window, &mut r)
                } else {
                    p
                }
            };
            // SAFETY: the features, as above.
            high = unsafe { high.or(p.high) };
            // SAFETY: the `p.taken * 64` octets after the old length were just written.
            unsafe { out.set_len(out.len() + p.taken * BLOCK) };
            taken += p.taken;
            if p.refused.is_some() {
                refused = p.refused;
                break;
            }
        }
        *rule = r;
        Run {
            len: taken * BLOCK,
            // SAFETY: the features, as above.
            eight_bit: unsafe { high.any_high() },
            refused,
        }
    }

    /// [`super::take_blocks`] with AVX-512BW (and BMI1/BMI2/LZCNT for the rule's bit scans,
    /// detected with it).
    #[target_feature(enable = "avx512bw,bmi1,bmi2,lzcnt")]
    pub(super) fn take_avx512<R: BlockRule>(input: &[u8], max_blocks: usize, rule: &mut R, out: &mut Vec<u8>) -> Run {
        // SAFETY: this function is compiled for, and only called with, these features.
        unsafe { take::<Avx512, R>(input, max_blocks, rule, out) }
    }

    /// [`super::take_blocks`] with AVX2 (and BMI1/BMI2/LZCNT for the rule's bit scans,
    /// detected with it).
    #[target_feature(enable = "avx2,bmi1,bmi2,lzcnt")]
    pub(super) fn take_avx2<R: BlockRule>(input: &[u8], max_blocks: usize, rule: &mut R, out: &mut Vec<u8>) -> Run {
        // SAFETY: this function is compiled for, and only called with, these features.
        unsafe { take::<Avx2, R>(input, max_blocks, rule, out) }
    }

    #[cfg(test)]
    #[target_feature(enable = "avx512bw,bmi1,bmi2,lzcnt")]
    pub(super) fn classify_avx512(block: &[u8; BLOCK]) -> Masks {
        // SAFETY: compiled for AVX-512BW; `block` is 64 readable octets.
        unsafe { Avx512::load(block.as_ptr()).masks::<true>() }
    }

    #[cfg(test)]
    #[target_feature(enable = "avx2,bmi1,bmi2,lzcnt")]
    pub(super) fn classify_avx2(block: &[u8; BLOCK]) -> Masks {
        // SAFETY: compiled for AVX2; `block` is 64 readable octets.
        unsafe { Avx2::load(block.as_ptr()).masks::<true>() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random blocks, mostly made of the octets that matter (and their neighbours, so an
    /// off-by-one compare would show), sometimes all one octet.
    fn random_block(rng: &mut fastrand::Rng) -> [u8; BLOCK] {
        const PICKS: &[u8] = b"\r\n.\0\x80\xff\x0c\x0e\x2d\x2f\x7f aZ";
        let mut b = [0u8; BLOCK];
        match rng.u8(0..8) {
            0 => b.fill(PICKS[rng.usize(0..PICKS.len())]),
            1 => b.iter_mut().for_each(|x| *x = rng.u8(..)),
            _ => b.iter_mut().for_each(|x| *x = PICKS[rng.usize(0..PICKS.len())]),
        }
        b
    }

    #[test]
    fn scalar_classifier_is_what_the_docs_say() {
        let mut b = [b'a'; BLOCK];
        b[0] = b'\r';
        b[1] = b'\n';
        b[31] = b'.';
        b[32] = 0;
        b[63] = b'\r';
        let m = classify_scalar(&b);
        assert_eq!(
            m,
            Masks {
                cr: 1 | 1 << 63,
                lf: 1 << 1,
                dot: 1 << 31,
                nul: 1 << 32
            }
        );
    }

    #[test]
    fn simd_classifiers_match_scalar_on_random_blocks() {
        let kinds = Simd::available();
        eprintln!("checking {kinds:?}");
        let mut rng = fastrand::Rng::with_seed(0xb10c);
        for _ in 0..20_000 {
            let b = random_block(&mut rng);
            let want = classify_scalar(&b);
            for &k in &kinds {
                assert_eq!(k.classify(&b), want, "{k:?} on {b:?}");
            }
        }
    }

    /// A rule that takes the first `refuse_at` blocks, folding the masks of each block it took
    /// into a checksum (the rule must be `Copy`, so it cannot keep a list).
    #[derive(Clone, Copy)]
    struct Recorder {
        taken: usize,
        refuse_at: usize,
        sum: u64,
    }

    impl Recorder {
        fn fold(sum: u64, m: Masks) -> u64 {
            let mix = |x: u64, y: u64| (x ^ y).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29);
            mix(mix(mix(mix(sum, m.cr), m.lf), m.dot), m.nul)
        }
    }

    impl BlockRule for Recorder {
        fn take(&mut self, m: Masks) -> bool {
            if self.taken == self.refuse_at {
                return false;
            }
            self.taken += 1;
            self.sum = Recorder::fold(self.sum, m);
            true
        }
    }

    #[test]
    fn take_blocks_matches_scalar_classification_and_copy() {
        let kinds = Simd::available();
        let mut rng = fastrand::Rng::with_seed(0x7a6e);
        for _ in 0..2_000 {
            // Mostly a few blocks; sometimes more than one 64-block output window.
            let max = if rng.u8(0..4) == 0 { 150 } else { 9 };
            let len = rng.usize(0..BLOCK * max);
            let mut input: Vec<u8> = Vec::with_capacity(len);
            while input.len() < len {
                input.extend_from_slice(&random_block(&mut rng));
            }
            input.truncate(len);
            // Often no NUL, or just one (a window is classified again only if it has one).
            if rng.bool() {
                input.iter_mut().filter(|b| **b == 0).for_each(|b| *b = b'z');
                if rng.bool() && len > 0 {
                    input[rng.usize(0..len)] = 0;
                }
            }
            // Mostly 7-bit input, so the 8-bit flag is not always set.
            if rng.bool() {
                input.iter_mut().for_each(|b| *b &= 0x7f);
                if rng.bool() && len > 0 {
                    input[rng.usize(0..len)] = rng.u8(0x80..);
                }
            }
            let max_blocks = rng.usize(0..max + 3);
            let refuse_at = rng.usize(0..max + 3);
            let prefix = vec![b'p'; rng.usize(0..3)];

            // The expected run, one octet at a time.
            let blocks: Vec<&[u8]> = input.chunks_exact(BLOCK).collect();
            let taken = blocks.len().min(max_blocks).min(refuse_at);
            let want_sum = blocks[..taken].iter().fold(0, |sum, &b| {
                Recorder::fold(sum, classify_scalar(b.try_into().expect("64 octets")))
            });
            let want_len = taken * BLOCK;
            let want_eight = input[..want_len].iter().any(|&b| b >= 0x80);
            let mut want_out = prefix.clone();
            want_out.extend_from_slice(&input[..want_len]);

            for &k in &kinds {
                let mut rule = Recorder {
                    taken: 0,
                    refuse_at,
                    sum: 0,
                };
                let mut out = prefix.clone();
                let run = take_blocks(k, &input, max_blocks, &mut rule, &mut out);
                let want_refused = (taken == refuse_at && taken < blocks.len().min(max_blocks))
                    .then(|| classify_scalar(blocks[taken].try_into().expect("64 octets")));
                assert_eq!(
                    run,
                    Run {
                        len: want_len,
                        eight_bit: want_eight,
                        refused: want_refused,
                    },
                    "{k:?}"
                );
                assert_eq!((rule.taken, rule.sum), (taken, want_sum), "{k:?}");
                assert_eq!(out, want_out, "{k:?}");
            }
        }
    }
}
