// Four runs at once on four threads, first with a pipeline each, then with one shared pipeline;
// every output must equal the same run done alone on one thread, bit for bit.
//
//   threads TXT2IMG_MODEL
#include "ldm.hpp"

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

static std::atomic<int> in_flight{0}, most_in_flight{0};

static ldm::Txt2Img job(int i) {
    static const char *schedulers[] = {"", "euler-a", "dpm++", "pndm"};
    ldm::Txt2Img t;
    t.prompts = {"a painting of a squirrel eating a burger"};
    if (i == 2) t.prompts.push_back("a red circle");
    t.steps = 4;
    t.guidance = i == 1 ? 1.0f : 3.0f;
    t.seed = 100 + i;
    t.scheduler = schedulers[i];
    return t;
}

// Counts how many runs are between their first and last progress report at once.
static ldm::Progress tracker() {
    return [](uint32_t step, uint32_t total) {
        if (step == 0) {
            int now = ++in_flight;
            int seen = most_in_flight.load();
            while (now > seen && !most_in_flight.compare_exchange_weak(seen, now)) {
            }
        }
        if (step == total) --in_flight;
        return true;
    };
}

static bool same(const std::vector<float> &a, const std::vector<float> &b, float *max_diff) {
    *max_diff = a.size() == b.size() ? 0.0f : INFINITY;
    for (std::size_t i = 0; i < a.size() && i < b.size(); i++) *max_diff = std::fmax(*max_diff, std::fabs(a[i] - b[i]));
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    const std::string model = argv[1];
    const int n = 4;
    int failures = 0;
    try {
        ldm::Pipeline alone(model);
        std::vector<std::vector<float>> expected;
        for (int i = 0; i < n; i++) expected.push_back(alone.txt2img(job(i)).floats());

        for (int shared = 0; shared <= 1; shared++) {
            std::vector<std::unique_ptr<ldm::Pipeline>> own;
            if (!shared)
                for (int i = 0; i < n; i++) own.push_back(std::make_unique<ldm::Pipeline>(model, ldm::load_options(i % 2)));
            std::vector<std::vector<float>> got(n);
            std::vector<std::string> errors(n);
            std::atomic<int> ready{0};
            most_in_flight = 0;
            std::vector<std::thread> threads;
            for (int i = 0; i < n; i++) {
                threads.emplace_back([&, i] {
                    ldm::Txt2Img t = job(i);
                    t.progress = tracker();
                    ++ready;
                    while (ready.load() < n) std::this_thread::yield(); // start together
                    try {
                        const ldm::Pipeline &p = shared ? alone : *own[i];
                        got[i] = p.txt2img(t).floats();
                    } catch (const std::exception &e) {
                        errors[i] = e.what();
                    }
                });
            }
            for (auto &t : threads) t.join();
            const char *how = shared ? "one shared pipeline" : "a pipeline each";
            for (int i = 0; i < n; i++) {
                float d;
                bool ok = errors[i].empty() && same(got[i], expected[i], &d);
                std::printf("%s %s, run %d (%zu values): max abs diff to the single-threaded run %g %s\n", ok ? "ok  " : "FAIL", how, i,
                            got[i].size(), errors[i].empty() ? d : NAN, errors[i].c_str());
                failures += !ok;
            }
            std::printf("%s: at most %d runs in flight at once\n", how, most_in_flight.load());
            if (most_in_flight.load() < 2) {
                std::printf("FAIL %s: the runs did not overlap\n", how);
                failures++;
            }
        }

        // An exception thrown by the progress callback cancels the run and reaches the caller.
        ldm::Txt2Img t = job(0);
        t.progress = [](uint32_t step, uint32_t) -> bool {
            if (step == 1) throw std::runtime_error("stop from the callback");
            return true;
        };
        try {
            alone.txt2img(t);
            std::printf("FAIL the callback's exception was lost\n");
            failures++;
        } catch (const std::runtime_error &e) {
            bool ok = std::strcmp(e.what(), "stop from the callback") == 0;
            std::printf("%s callback exception rethrown: %s\n", ok ? "ok  " : "FAIL", e.what());
            failures += !ok;
        }
        t.progress = [](uint32_t step, uint32_t) { return step < 2; };
        try {
            alone.txt2img(t);
            failures++;
        } catch (const ldm::Cancelled &e) {
            std::printf("ok   ldm::Cancelled: %s (%s)\n", e.what(), e.status_name());
        }
        try {
            ldm::Pipeline missing("/no/such/model");
            failures++;
        } catch (const ldm::Error &e) {
            bool ok = e.status() == LDM_ERR_NOT_FOUND;
            std::printf("%s ldm::Error %s: %s\n", ok ? "ok  " : "FAIL", e.status_name(), e.what());
            failures += !ok;
        }
    } catch (const std::exception &e) {
        std::printf("FAIL %s\n", e.what());
        return 1;
    }
    std::printf("%d failure(s)\n", failures);
    return failures ? 1 : 0;
}
