// Text to image with libldm, in C++ (RAII wrapper ldm.hpp).
//
//   c++ -std=c++17 example.cpp $(pkg-config --cflags --libs ldm) -o example
//   ./example MODEL "a red circle" out.png [STEPS]
#include <ldm.hpp>

#include <cstdio>
#include <string>

int main(int argc, char **argv) {
    if (argc < 4) {
        std::fprintf(stderr, "usage: %s MODEL PROMPT OUT.png [STEPS]\n", argv[0]);
        return 2;
    }
    try {
        ldm::Pipeline pipeline(argv[1]);
        ldm::Txt2Img params;
        params.prompts = {argv[2]};
        params.steps = argc > 4 ? std::stoul(argv[4]) : 20;
        params.seed = 42;
        params.progress = [](uint32_t step, uint32_t total) {
            std::fprintf(stderr, "\rstep %u/%u", step, total);
            return true; // false would cancel: txt2img() then throws ldm::Cancelled
        };
        ldm::Images images = pipeline.txt2img(params);
        images.write_png(0, argv[3]);
        std::printf("\nwrote %s (%ux%u)\n", argv[3], images.width(), images.height());
    } catch (const ldm::Error &e) {
        std::fprintf(stderr, "\nerror: %s\n", e.what());
        return 1;
    }
    return 0;
}
