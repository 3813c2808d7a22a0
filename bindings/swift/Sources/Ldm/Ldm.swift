// A small Swift layer over libldm: a Pipeline class, async generation that honours Task
// cancellation through the progress callback, progress reports, and images as raw RGB/RGBA
// (everywhere) or CGImage (where CoreGraphics exists).

@_exported import CLdm
import Foundation
#if canImport(CoreGraphics)
import CoreGraphics
#endif

/// A failed call: the C status and the message of ldm_last_error().
public struct LdmError: Error, CustomStringConvertible, @unchecked Sendable {
    public let status: LdmStatus
    public let message: String
    public var description: String { message }
}

/// Throws for a status other than LDM_OK; call right after the C function, on the same thread.
func check(_ status: LdmStatus) throws {
    guard status != LDM_OK else { return }
    throw LdmError(status: status, message: String(cString: ldm_last_error()))
}

/// One image: 8-bit RGB and the same pixels as floats in [0, 1], row-major.
public struct Image: Sendable {
    public let width: Int
    public let height: Int
    /// width * height * 3 bytes.
    public let rgb: [UInt8]
    /// width * height * 3 floats in [0, 1]: diffusers' output_type="np" values.
    public let rgbFloat: [Float]

    /// width * height * 4 bytes, alpha 255.
    public var rgba: [UInt8] {
        var out = [UInt8](repeating: 255, count: width * height * 4)
        for i in 0..<(width * height) {
            out[4 * i] = rgb[3 * i]
            out[4 * i + 1] = rgb[3 * i + 1]
            out[4 * i + 2] = rgb[3 * i + 2]
        }
        return out
    }

    public init(width: Int, height: Int, rgb: [UInt8], rgbFloat: [Float]) {
        self.width = width
        self.height = height
        self.rgb = rgb
        self.rgbFloat = rgbFloat
    }

    /// Decodes a PNG, JPEG or WebP file held in memory (ldm_decode_image).
    public init(encoded bytes: [UInt8]) throws {
        var out: UnsafeMutablePointer<LdmImages>? = nil
        try check(bytes.withUnsafeBufferPointer { ldm_decode_image($0.baseAddress, $0.count, &out) })
        defer { ldm_images_free(out) }
        self = Image.all(out!)[0]
    }

    /// Copies every image out of an LdmImages.
    static func all(_ p: UnsafeMutablePointer<LdmImages>) -> [Image] {
        let im = p.pointee
        let (w, h) = (Int(im.width), Int(im.height))
        let n = w * h * 3
        return (0..<Int(im.count)).map { i in
            Image(width: w, height: h,
                  rgb: Array(UnsafeBufferPointer(start: im.rgb8!.advanced(by: i * n), count: n)),
                  rgbFloat: Array(UnsafeBufferPointer(start: im.rgb_f32!.advanced(by: i * n), count: n)))
        }
    }

    #if canImport(CoreGraphics)
    /// The image as a CGImage (RGB, 8 bits per channel).
    public var cgImage: CGImage? {
        guard let provider = CGDataProvider(data: Data(rgba) as CFData) else { return nil }
        return CGImage(width: width, height: height, bitsPerComponent: 8, bitsPerPixel: 32, bytesPerRow: width * 4,
                       space: CGColorSpaceCreateDeviceRGB(),
                       bitmapInfo: CGBitmapInfo(rawValue: CGImageAlphaInfo.noneSkipLast.rawValue),
                       provider: provider, decode: nil, shouldInterpolate: false, intent: .defaultIntent)
    }

    /// The 8-bit RGB pixels of any CGImage (drawn into an RGBA context, alpha dropped).
    public init?(cgImage: CGImage) {
        let (w, h) = (cgImage.width, cgImage.height)
        var rgba = [UInt8](repeating: 0, count: w * h * 4)
        let drawn: Bool = rgba.withUnsafeMutableBytes { buf in
            guard let ctx = CGContext(data: buf.baseAddress, width: w, height: h, bitsPerComponent: 8, bytesPerRow: w * 4,
                                      space: CGColorSpaceCreateDeviceRGB(),
                                      bitmapInfo: CGImageAlphaInfo.noneSkipLast.rawValue) else { return false }
            ctx.draw(cgImage, in: CGRect(x: 0, y: 0, width: w, height: h))
            return true
        }
        guard drawn else { return nil }
        var rgb = [UInt8](repeating: 0, count: w * h * 3)
        for i in 0..<(w * h) {
            rgb[3 * i] = rgba[4 * i]
            rgb[3 * i + 1] = rgba[4 * i + 1]
            rgb[3 * i + 2] = rgba[4 * i + 2]
        }
        self.init(width: w, height: h, rgb: rgb, rgbFloat: rgb.map { Float($0) / 255 })
    }
    #endif
}

/// Progress of a run: (step, totalSteps), called before each model call and once at the end.
public typealias ProgressHandler = @Sendable (_ step: Int, _ totalSteps: Int) -> Void

/// What the C progress callback sees: the handler and the Task's cancellation.
final class RunControl: @unchecked Sendable {
    private let lock = NSLock()
    private var cancelled = false
    private let progress: ProgressHandler?

    init(progress: ProgressHandler?) { self.progress = progress }

    func cancel() {
        lock.lock()
        cancelled = true
        lock.unlock()
    }

    var isCancelled: Bool {
        lock.lock()
        defer { lock.unlock() }
        return cancelled
    }

    /// false cancels the run.
    func report(step: Int, total: Int) -> Bool {
        progress?(step, total)
        return !isCancelled
    }
}

/// The C callback: forwards to the RunControl passed as `user`.
private let progressTrampoline: LdmProgressFn = { user, step, total in
    Unmanaged<RunControl>.fromOpaque(user!).takeUnretainedValue().report(step: Int(step), total: Int(total))
}

extension Optional where Wrapped == String {
    func withOptionalCString<R>(_ body: (UnsafePointer<CChar>?) throws -> R) rethrows -> R {
        switch self {
        case .some(let s): return try s.withCString(body)
        case .none: return try body(nil)
        }
    }
}

/// A loaded model. Safe to share between tasks: several runs on one pipeline may go at once.
public final class Pipeline: @unchecked Sendable {
    private let handle: OpaquePointer

    /// Loads a diffusers folder or hub id (ldm_pipeline_load). `threads` 0: every core.
    /// `precision` LDM_PRECISION_BF16: bf16 weights on the CPU (LdmLoadOptions.precision).
    public init(model: String, threads: UInt32 = 0, offline: Bool = false, cacheDirectory: String? = nil,
                precision: LdmPrecision = LDM_PRECISION_F32) throws {
        var options = ldm_load_options_default()
        options.threads = threads
        options.offline = offline ? 1 : 0
        options.precision = precision.rawValue
        var out: OpaquePointer? = nil
        let status = cacheDirectory.withOptionalCString { dir -> LdmStatus in
            options.cache_dir = dir
            return ldm_pipeline_load(model, &options, &out)
        }
        try check(status)
        handle = out!
    }

    deinit { ldm_pipeline_free(handle) }

    /// LDM_PIPELINE_TXT2IMG or LDM_PIPELINE_SUPERRES.
    public var kind: LdmPipelineKind { ldm_pipeline_kind(handle) }

    /// Text to image: one image per prompt. nil parameters take the pipeline's defaults.
    /// Cancelling the Task stops the run before its next model call and throws CancellationError.
    public func textToImage(prompts: [String], steps: UInt32? = nil, guidance: Float? = nil, eta: Float? = nil,
                            seed: UInt64? = nil, width: UInt32? = nil, height: UInt32? = nil,
                            scheduler: String? = nil, progress: ProgressHandler? = nil) async throws -> [Image] {
        try await run(progress: progress) { control in
            var params = ldm_txt2img_params_default()
            if let steps { params.steps = steps }
            if let guidance { params.guidance = guidance }
            if let eta { params.eta = eta }
            if let seed { params.seed = seed }
            if let width { params.width = width }
            if let height { params.height = height }
            let cStrings = prompts.map { strdup($0) }
            defer { cStrings.forEach { free($0) } }
            let pointers: [UnsafePointer<CChar>?] = cStrings.map { UnsafePointer($0) }
            var out: UnsafeMutablePointer<LdmImages>? = nil
            let status = pointers.withUnsafeBufferPointer { buf in
                scheduler.withOptionalCString { name -> LdmStatus in
                    params.prompts = buf.baseAddress
                    params.prompt_count = buf.count
                    params.scheduler = name
                    params.progress = progressTrampoline
                    params.progress_user = Unmanaged.passUnretained(control).toOpaque()
                    return ldm_txt2img(self.handle, &params, &out)
                }
            }
            try check(status)
            defer { ldm_images_free(out) }
            return Image.all(out!)
        }
    }

    /// 4x super-resolution of one 8-bit RGB image (width * height * 3 bytes).
    public func superResolution(rgb: [UInt8], width: Int, height: Int, steps: UInt32? = nil, eta: Float? = nil,
                                seed: UInt64? = nil, scheduler: String? = nil,
                                progress: ProgressHandler? = nil) async throws -> Image {
        guard rgb.count == width * height * 3, let w = UInt32(exactly: width), let h = UInt32(exactly: height) else {
            throw LdmError(status: LDM_ERR_INVALID_ARGUMENT,
                           message: "superResolution: \(rgb.count) bytes of RGB for a \(width)x\(height) image")
        }
        return try await run(progress: progress) { control in
            var params = ldm_superres_params_default()
            if let steps { params.steps = steps }
            if let eta { params.eta = eta }
            if let seed { params.seed = seed }
            params.width = w
            params.height = h
            var out: UnsafeMutablePointer<LdmImages>? = nil
            let status = rgb.withUnsafeBufferPointer { buf in
                scheduler.withOptionalCString { name -> LdmStatus in
                    params.rgb = buf.baseAddress
                    params.scheduler = name
                    params.progress = progressTrampoline
                    params.progress_user = Unmanaged.passUnretained(control).toOpaque()
                    return ldm_superres(self.handle, &params, &out)
                }
            }
            try check(status)
            defer { ldm_images_free(out) }
            return Image.all(out!)[0]
        }
    }

    #if canImport(CoreGraphics)
    /// 4x super-resolution of a CGImage.
    public func superResolution(_ image: CGImage, steps: UInt32? = nil, eta: Float? = nil, seed: UInt64? = nil,
                                scheduler: String? = nil, progress: ProgressHandler? = nil) async throws -> Image {
        guard let input = Image(cgImage: image) else {
            throw LdmError(status: LDM_ERR_INVALID_ARGUMENT, message: "superResolution: the CGImage could not be drawn")
        }
        return try await superResolution(rgb: input.rgb, width: input.width, height: input.height, steps: steps,
                                         eta: eta, seed: seed, scheduler: scheduler, progress: progress)
    }
    #endif

    /// Runs a blocking C call on a global queue. The Task's cancellation reaches the call through
    /// the progress callback, and the LDM_CANCELLED that follows becomes CancellationError.
    private func run<T: Sendable>(progress: ProgressHandler?,
                                  _ body: @escaping @Sendable (RunControl) throws -> T) async throws -> T {
        let control = RunControl(progress: progress)
        return try await withTaskCancellationHandler {
            try Task.checkCancellation()
            return try await withCheckedThrowingContinuation { continuation in
                DispatchQueue.global(qos: .userInitiated).async {
                    continuation.resume(with: Result {
                        do {
                            return try body(control)
                        } catch let e as LdmError where e.status == LDM_CANCELLED {
                            throw CancellationError()
                        }
                    })
                }
            }
        } onCancel: {
            control.cancel()
        }
    }
}
