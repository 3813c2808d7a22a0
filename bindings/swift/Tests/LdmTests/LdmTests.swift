// Runs on the repository's tiny test models (tests/fixtures). Not run by our CI: no Swift
// toolchain there (see README.md).
import XCTest
@testable import Ldm

final class LdmTests: XCTestCase {
    static let fixtures = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().appendingPathComponent("../../../../tests/fixtures").standardized

    func testTextToImageGivesOneImagePerPrompt() async throws {
        let pipeline = try Pipeline(model: Self.fixtures.appendingPathComponent("txt2img-tiny").path, offline: true)
        XCTAssertEqual(pipeline.kind, LDM_PIPELINE_TXT2IMG)
        let images = try await pipeline.textToImage(prompts: ["a red circle", "a blue square"], steps: 3, seed: 1)
        XCTAssertEqual(images.count, 2)
        XCTAssertEqual(images[0].width, 64)
        XCTAssertEqual(images[0].rgba.count, 64 * 64 * 4)
    }

    func testCancellingTheTaskCancelsTheRun() async throws {
        let pipeline = try Pipeline(model: Self.fixtures.appendingPathComponent("txt2img-tiny").path, offline: true)
        let task = Task { try await pipeline.textToImage(prompts: ["a red circle"], steps: 1000) }
        try await Task.sleep(nanoseconds: 100_000_000)
        task.cancel()
        do {
            _ = try await task.value
            XCTFail("the run was not cancelled")
        } catch is CancellationError {
        }
    }

    func testErrorsCarryTheStatusAndMessage() throws {
        XCTAssertThrowsError(try Pipeline(model: "/no/such/model")) { error in
            let e = error as! LdmError
            XCTAssertEqual(e.status, LDM_ERR_NOT_FOUND)
            XCTAssertTrue(e.message.contains("/no/such/model"))
        }
    }
}
